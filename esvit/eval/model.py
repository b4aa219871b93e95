"""The backbone an evaluation runs on: a pretraining checkpoint's teacher (or student), or the same
architecture freshly initialised (``--random-init``, the "no pretraining" baseline), plus the shared
command-line options that choose it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_backbone, load_checkpoint
from ..errors import CheckpointError, ConfigError
from ..models import ARCHS, VIT_ARCHS, ResNetBackbone, SwinTransformer, VisionTransformer, create_backbone

__all__ = ["EvalModel", "add_model_arguments", "load_eval_model", "model_from_args", "token_grid"]


@dataclass
class EvalModel:
    """A frozen backbone in eval mode and what it is."""

    backbone: nn.Module
    arch: str
    crop_size: int
    source: str  # human-readable: "teacher of CKPT (epoch 8)" or "random init (seed 0)"
    backend: str  # window-attention backend the Swin resolves to on this device ("-" for the others)
    config: dict | None = None

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)


def _attention_backend(backbone: nn.Module, requested: str, device: torch.device) -> str:
    if not isinstance(backbone, SwinTransformer):
        return "-"
    from esvit_kernels.backends import resolve_backend

    return resolve_backend(requested, device, op="shifted_window_attention")[0]


def load_eval_model(
    checkpoint: str | None = None, *, which: str = "teacher", random_init: bool = False, arch: str | None = None,
    window_size: int = 7, crop_size: int | None = None, patch_size: int = 16, backend: str = "auto",
    device: str | torch.device = "cpu", seed: int = 0,
) -> EvalModel:
    """The backbone to evaluate, frozen, in eval mode, on ``device``.

    With ``checkpoint``: its ``which`` backbone (``arch``, when given, must match the checkpoint's), or with
    ``random_init`` the same architecture and crop size freshly initialised from ``seed``. Without a
    checkpoint, ``random_init`` and ``arch`` are required (``window_size``, ``crop_size`` (default 224),
    ``patch_size`` describe it).
    """
    device = torch.device(device)
    if checkpoint is not None:
        path = Path(checkpoint)
        if random_init:
            cfg = load_checkpoint(path)["config"]
            if arch is not None and cfg["model"]["arch"] != arch:
                raise CheckpointError(f"{path} holds a {cfg['model']['arch']} backbone, not {arch}")
            m = cfg["model"]
            model = _fresh(m["arch"], m["window_size"], cfg["data"]["global_crop_size"], m["patch_size"], backend,
                           seed)
            source = f"random init (seed {seed}) of the {m['arch']} of {path}"
        else:
            model, cfg = load_backbone(path, which=which, backend=backend, expect_arch=arch)
            source = f"{which} of {path}"
        arch_name, crop = cfg["model"]["arch"], int(cfg["data"]["global_crop_size"])
        if crop_size is not None and crop_size != crop:
            raise ConfigError(f"{path} was trained with {crop}-px global crops; drop --crop-size (it is taken "
                              "from the checkpoint)")
    else:
        if not random_init:
            raise ConfigError("pass --checkpoint CKPT, or --random-init with --arch for an untrained baseline")
        if arch is None:
            raise ConfigError(f"--random-init without --checkpoint needs --arch ({', '.join(ARCHS)})")
        if arch not in ARCHS:
            raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
        crop = 224 if crop_size is None else int(crop_size)
        model = _fresh(arch, window_size, crop, patch_size, backend, seed)
        arch_name, cfg, source = arch, None, f"random init (seed {seed})"
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return EvalModel(model, arch_name, crop, source, _attention_backend(model, backend, device), cfg)


def _fresh(arch: str, window_size: int, crop: int, patch_size: int, backend: str, seed: int) -> nn.Module:
    kwargs = {"patch_size": patch_size} if arch in VIT_ARCHS else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_backbone(arch, window_size=window_size, img_size=crop, backend=backend, drop_path_rate=0.0,
                               **kwargs)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared by the evaluation commands to pick the backbone."""
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="CKPT", help="checkpoint.pth written by `esvit pretrain`")
    g.add_argument("--which", choices=("teacher", "student"), default="teacher",
                   help="backbone of the checkpoint to evaluate (default: teacher, as the paper)")
    g.add_argument("--random-init", action="store_true",
                   help="the same architecture freshly initialised (the 'no pretraining' baseline)")
    g.add_argument("--arch", choices=ARCHS, help="architecture (with --random-init and no checkpoint; with a "
                                                 "checkpoint, checked against it)")
    g.add_argument("--window-size", type=int, default=7, help="Swin window of a --random-init --arch model")
    g.add_argument("--crop-size", type=int, help="input size of a --random-init --arch model (default 224)")
    g.add_argument("--patch-size", type=int, default=16, help="ViT patch size of a --random-init --arch model")
    g.add_argument("--seed", type=int, default=0, help="seed of --random-init (and of random augmentations)")
    g.add_argument("--backend", choices=("auto", "triton", "cuda", "torch"), default="auto",
                   help="window-attention backend (default auto: fused on a GPU, eager reference on the CPU)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def model_from_args(args: argparse.Namespace, device: torch.device) -> EvalModel:
    return load_eval_model(args.checkpoint, which=args.which, random_init=args.random_init, arch=args.arch,
                           window_size=args.window_size, crop_size=args.crop_size, patch_size=args.patch_size,
                           backend=args.backend, device=device, seed=args.seed)


def token_grid(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Final region features (B, h*w, C), row-major, and their grid (h, w): Swin's final-LN tokens, a ViT's
    patch tokens, a ResNet's final map positions."""
    if isinstance(backbone, SwinTransformer):
        return backbone.forward_features(x)
    if isinstance(backbone, VisionTransformer):
        _, patches = backbone(x)
        return patches, (x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size)
    if isinstance(backbone, ResNetBackbone):
        fmap = backbone.forward_map(x)
        return fmap.flatten(2).transpose(1, 2), (fmap.shape[2], fmap.shape[3])
    raise TypeError(f"no region-token grid for {type(backbone).__name__}")


