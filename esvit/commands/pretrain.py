"""``esvit pretrain``: self-supervised EsViT pretraining (single process, or one per GPU under torchrun)."""

from __future__ import annotations

import argparse

from ..config import describe, load_config, set_value

HELP = "pretrain a backbone with EsViT (view + region self-distillation)"
DESCRIPTION = """\
Pretrain a backbone with EsViT: a student sees 2 global + N local crops of every image, an EMA teacher
the 2 global crops; the loss is w_v * L_V (view-level DINO) + w_r * L_R (region matching), on the fused
kernels of esvit_kernels (--backend torch switches to the eager reference for comparison).

Configuration: defaults <- --config YAML <- section.key=value arguments <- the flags below. Outputs go
to --output: config.yaml, log.jsonl (one JSON line per epoch), checkpoint.pth (written atomically every
epoch and every --save-every steps; running the same command again resumes from it). One run per --output
at a time: a second one is refused.

Examples:
  esvit pretrain --config configs/demo_cpu.yaml --data embedded --output runs/demo
  esvit pretrain --config configs/swin_tiny_w7.yaml --data /imagenet/train --output runs/t optim.lr=1e-3
  torchrun --nproc-per-node 8 -m esvit pretrain --config configs/swin_tiny_w7.yaml \\
      --data /imagenet/train --output runs/t           (--batch-size is per process)
"""

# flag -> config keys it sets
FLAGS: dict[str, tuple[str, ...]] = {
    "arch": ("model.arch",),
    "window_size": ("model.window_size",),
    "data": ("data.path",),
    "output": ("train.output",),
    "epochs": ("optim.epochs",),
    "batch_size": ("optim.batch_size",),
    "lr": ("optim.lr",),
    "device": ("train.device",),
    "backend": ("model.backend", "loss.backend"),
    "precision": ("train.precision",),
    "seed": ("train.seed",),
    "save_every": ("train.save_every",),
    "num_workers": ("data.num_workers",),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "configuration fields (section.key = default), all settable as section.key=value:\n\n" + describe()
    p.add_argument("--config", metavar="YAML", help="YAML preset (see configs/); may extend another with 'base:'")
    p.add_argument("--arch", help="backbone (model.arch): swin_micro(_conv), swin_tiny, swin_small, swin_base, "
                                  "deit_small, vit_base, resnet50, cvt_micro, cvt_v4_s1(_rpe)(_shift), "
                                  "vil_micro, vil_2262, vil_small")
    p.add_argument("--window-size", type=int, help="Swin / CvT window size (model.window_size): 7 or 14")
    p.add_argument("--data", metavar="DIR", help="ImageFolder directory, or 'embedded' for the generated "
                                                 "dataset (data.path)")
    p.add_argument("--output", metavar="DIR", help="output directory (train.output)")
    p.add_argument("--epochs", type=int, help="training epochs (optim.epochs)")
    p.add_argument("--batch-size", type=int, help="images per process and step (optim.batch_size)")
    p.add_argument("--lr", type=float, help="peak LR for a global batch of 256 (optim.lr)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (train.device)")
    p.add_argument("--backend", choices=("auto", "triton", "cuda", "torch"),
                   help="kernel backend of the window attention and the losses (model.backend, loss.backend)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision (train.precision)")
    p.add_argument("--seed", type=int, help="random seed (train.seed)")
    p.add_argument("--save-every", type=int, metavar="N", help="also checkpoint every N steps (train.save_every)")
    p.add_argument("--num-workers", type=int, help="data-loading workers per process (data.num_workers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (train.progress=false)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="any configuration field, e.g. optim.lr=1e-3 loss.region_weight=0")


def build_config(args: argparse.Namespace) -> dict:
    """The validated config of the command line."""
    from ..config import validate

    cfg = load_config(args.config, args.overrides)
    for flag, keys in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            for key in keys:
                set_value(cfg, key, value)
    if args.no_progress:
        set_value(cfg, "train.progress", False)
    return validate(cfg)


def run(args: argparse.Namespace) -> int:
    from ..train import pretrain

    pretrain(build_config(args))
    return 0
