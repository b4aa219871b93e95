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

from ..checkpoint import load_checkpoint
from ..errors import CheckpointError, ConfigError
from ..models import (
    ARCHS,
    VIT_ARCHS,
    CvTTransformer,
    ResNetBackbone,
    SwinTransformer,
    VisionLongformer,
    VisionTransformer,
    create_backbone,
    min_crop_size,
)

__all__ = ["EvalModel", "add_model_arguments", "device_name", "load_eval_model", "model_from_args", "token_grid"]


@dataclass
class EvalModel:
    """A frozen backbone in eval mode and what it is."""

    backbone: nn.Module
    arch: str
    crop_size: int
    source: str  # human-readable: "teacher of CKPT (epoch 8)" or "random init (seed 0)"
    backend: str  # attention backend the Swin / ViL resolves to on this device ("-" for the others)
    config: dict | None = None

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)


def _attention_backend(backbone: nn.Module, requested: str, device: torch.device) -> str:
    if isinstance(backbone, (SwinTransformer, CvTTransformer)):
        op = "shifted_window_attention"
    elif isinstance(backbone, VisionLongformer):
        op = "neighborhood_window_attention"
    else:
        return "-"
    from esvit_kernels.backends import resolve_backend

    return resolve_backend(requested, device, op=op)[0]


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
        state = load_checkpoint(path)
        cfg = state.get("config")
        m, crop = _stored_spec(cfg, path)
        if arch is not None and m["arch"] != arch:
            raise CheckpointError(f"{path} holds a {m['arch']} backbone, not {arch}")
        if crop_size is not None and crop_size != crop:
            raise ConfigError(f"{path} was trained with {crop}-px global crops; drop --crop-size (it is taken "
                              "from the checkpoint)")
        model = _fresh(m["arch"], m["window_size"], crop, m["patch_size"], backend, seed)
        if random_init:
            source = f"random init (seed {seed}) of the {m['arch']} of {path}"
        else:
            _load_weights(model, state, which, path, m["arch"])
            source = f"{which} of {path}"
        arch_name = m["arch"]
    else:
        if not random_init:
            raise ConfigError("pass --checkpoint CKPT, or --random-init with --arch for an untrained baseline")
        if arch is None:
            raise ConfigError(f"--random-init without --checkpoint needs --arch ({', '.join(ARCHS)})")
        crop = 224 if crop_size is None else crop_size
        problem = _spec_problem(arch, window_size, crop, patch_size)
        if problem:
            raise ConfigError(f"cannot build the --random-init backbone: {problem}; check --arch, --window-size, "
                              "--crop-size and --patch-size")
        model = _fresh(arch, window_size, crop, patch_size, backend, seed)
        arch_name, cfg, source = arch, None, f"random init (seed {seed})"
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return EvalModel(model, arch_name, crop, source, _attention_backend(model, backend, device), cfg)


def _spec_problem(arch: object, window_size: object, crop: object, patch_size: object) -> str | None:
    """What makes (arch, window, crop, patch) unbuildable, or None."""
    if not isinstance(arch, str) or arch not in ARCHS:
        return f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})"
    for name, v in (("window size", window_size), ("crop size", crop), ("patch size", patch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            return f"the {name} must be an integer >= 1, got {v!r}"
    smallest = min_crop_size(arch, patch_size)
    if crop < smallest:
        return f"a {crop}-px crop is smaller than one patch of {arch} ({smallest} px)"
    return None


def _stored_spec(cfg: object, path: Path) -> tuple[dict, int]:
    """(model section, global crop size) of a checkpoint's stored config, checked to build a backbone."""
    model = cfg.get("model") if isinstance(cfg, dict) else None
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or not isinstance(data, dict):
        raise CheckpointError(f"{path} has no stored config (model / data sections), so its backbone cannot be "
                              "rebuilt; evaluate a checkpoint written by `esvit pretrain`")
    m = {k: model.get(k) for k in ("arch", "window_size", "patch_size")}
    crop = data.get("global_crop_size")
    problem = _spec_problem(m["arch"], m["window_size"], crop, m["patch_size"])
    if problem:
        raise CheckpointError(f"{path}: the stored config cannot be rebuilt: {problem}; was it written by another "
                              "version of esvit?")
    return m, crop


def _load_weights(model: nn.Module, state: dict, which: str, path: Path, arch: str) -> None:
    """Load the checkpoint's ``which`` backbone into ``model``; refuse weights that do not fit or are not
    finite (a NaN checkpoint would evaluate at chance without a word)."""
    weights = state.get(which)
    if not isinstance(weights, dict):
        other = "student" if which == "teacher" else "teacher"
        raise CheckpointError(f"{path} has no {which} weights; try --which {other}")
    sd = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    reshaped = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or reshaped:  # one line, not torch's list of every key
        raise CheckpointError(f"the {which} weights in {path} do not fit a {arch} backbone ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(reshaped)} of another shape, e.g. "
                              f"{(missing + unexpected + reshaped)[0]}): its weights and stored config disagree")
    model.load_state_dict(sd, strict=True)
    bad = [k for k, v in sd.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"the {which} weights in {path} are not finite ({len(bad)} of {len(sd)} tensors hold "
                              f"NaN/inf, e.g. {bad[0]}): training diverged before this checkpoint was saved; "
                              "evaluate an earlier one (checkpointNNNN.pth)")


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
    g.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")


def device_name(value: str) -> str:
    """argparse type of ``--device``: a usage error for anything but auto, cpu, cuda or cuda:N."""
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")


def model_from_args(args: argparse.Namespace, device: torch.device) -> EvalModel:
    return load_eval_model(args.checkpoint, which=args.which, random_init=args.random_init, arch=args.arch,
                           window_size=args.window_size, crop_size=args.crop_size, patch_size=args.patch_size,
                           backend=args.backend, device=device, seed=args.seed)


def token_grid(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Final region features (B, h*w, C), row-major, and their grid (h, w): Swin's, CvT's and ViL's final-LN
    (local) tokens, a ViT's patch tokens, a ResNet's final map positions."""
    if isinstance(backbone, (SwinTransformer, CvTTransformer, VisionLongformer)):
        return backbone.forward_features(x)
    if isinstance(backbone, VisionTransformer):
        _, patches = backbone(x)
        return patches, (x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size)
    if isinstance(backbone, ResNetBackbone):
        fmap = backbone.forward_map(x)
        return fmap.flatten(2).transpose(1, 2), (fmap.shape[2], fmap.shape[3])
    raise TypeError(f"no region-token grid for {type(backbone).__name__}")


