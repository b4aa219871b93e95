"""``esvit ablate``: view-only vs view+region pretraining (and random init), several seeds, one report."""

from __future__ import annotations

import argparse

HELP = "the L_R ablation: view-only vs view+region pretraining vs random init over several seeds"
DESCRIPTION = """\
The paper's Table 8 at the scale of a preset: on one generated, labelled dataset (the preset's
data.embedded_* fields, --val-fraction held out), pretrain each variant with each seed -- `view` (the
official view-only loss, loss.region_weight=0), `view+region` (the preset's loss weights) -- and take a
randomly initialised backbone per seed (`random`); evaluate each on the same held-out split: k-NN top-1
(k=20), linear probe (best over the probe's learning rates) and the correspondence accuracy of the region
features between an image and its flipped, colour-jittered view. Writes OUTPUT/ablation.json, OUTPUT/
ablation.png (bars: mean over seeds, points: seeds) and prints mean +- std with the per-seed paired
differences. Resumable: a rerun skips finished runs (OUTPUT/runs/<variant>/seed<N>/result.json) and
resumes an unfinished pretraining from its checkpoint.

Example:
  esvit ablate --config configs/demo_cpu.yaml --output runs/ablation --seeds 3
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..eval.model import device_name

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", metavar="YAML",
                   help="pretraining preset of the view+region variant (default configs/demo_cpu.yaml)")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every variant (default 3)")
    p.add_argument("--variants", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                   default=["view", "view+region", "random"],
                   help="comma-separated subset of view,view+region,random (default all three)")
    p.add_argument("--jobs", type=int, default=1,
                   help="pretrainings run side by side as child processes, each with cpu_count / jobs threads "
                        "(default 1: one after the other in this process)")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", choices=("auto", "triton", "cuda", "torch"), default="auto",
                   help="kernel backend of pretraining and evaluation (default auto)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the images held out (default 0.2)")
    p.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs (default 100)")
    p.add_argument("--corr-images", type=int, default=256,
                   help="validation images of the correspondence accuracy (default 256)")
    p.add_argument("--num-workers", type=int, default=1, help="data-loading workers of the evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="pretraining config overrides of every variant, e.g. optim.epochs=4")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..eval.ablate import run_ablation

    if not 0 < args.val_fraction < 1 or args.probe_epochs < 1 or args.corr_images < 1:
        raise ConfigError("--val-fraction must be in (0, 1), --probe-epochs and --corr-images >= 1")
    if args.num_workers < 0 or args.jobs < 1:
        raise ConfigError("--num-workers must be >= 0 and --jobs >= 1")
    run_ablation(args)
    return 0
