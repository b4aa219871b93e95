"""``esvit demo``: generated data -> EsViT pretraining -> evaluation against random init -> report."""

from __future__ import annotations

import argparse

HELP = "the whole story: pretrain the tiny preset, evaluate it against random init, draw, report"
DESCRIPTION = """\
End-to-end demo on a generated, labelled dataset (no download): generate train/val images, pretrain with
`esvit pretrain` (configs/demo_cpu.yaml on the CPU, a few minutes; configs/demo_gpu.yaml -- longer, bigger
-- when a GPU is present), then evaluate the pretrained teacher and the same architecture at random
initialisation -- and, as a quick L_R ablation, the same pretraining with the view loss only (one
seed, both pretrainings side by side on a multi-core CPU; `esvit ablate` runs it over seeds): weighted
k-NN (k = 10, 20, 100, 200), linear probe, and the
correspondence accuracy of region features between each validation image and its flipped,
colour-jittered view. Draws the
correspondences (pretrained and random init) and the last-block attention, and prints a short report
(also OUTPUT/report.json). Running it again resumes / reuses the pretraining unless --fresh.

Example:
  esvit demo --output runs/demo --fresh
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..eval.model import device_name

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--output", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--fresh", action="store_true", help="discard OUTPUT/pretrain first (pretrain from scratch)")
    p.add_argument("--config", metavar="YAML", help="pretraining preset (default: configs/demo_cpu.yaml, or "
                                                    "configs/demo_gpu.yaml when a GPU is present)")
    p.add_argument("--epochs", type=int, help="pretraining epochs (default: the preset's)")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", choices=("auto", "triton", "cuda", "torch"), default="auto",
                   help="kernel backend of pretraining and evaluation (default auto)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the images held out (default 0.2)")
    p.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs (default 100)")
    p.add_argument("--num-workers", type=int, default=1, help="data-loading workers of the evaluation")
    p.add_argument("--picture-index", type=int, default=0, help="validation image drawn (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline and the jitter")
    p.add_argument("--no-ablation", action="store_true",
                   help="skip the quick L_R ablation (the same pretraining without the region loss, one seed)")
    p.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                   help="2 (default): on a CPU with >= 2 cores the quick ablation's two pretrainings run side by "
                        "side in child processes, cpu_count / 2 threads each; 1: one after the other")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="pretraining config overrides, e.g. optim.lr=1e-3")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..eval.demo import run_demo

    if not 0 < args.val_fraction < 1 or args.probe_epochs < 1:
        raise ConfigError("--val-fraction must be in (0, 1) and --probe-epochs >= 1")
    if args.num_workers < 0 or (args.epochs is not None and args.epochs < 1):
        raise ConfigError("--num-workers must be >= 0 and --epochs >= 1")
    run_demo(args)
    return 0
