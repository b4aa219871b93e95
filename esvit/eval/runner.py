"""Shared plumbing of the evaluation commands: device / process group, data loaders, features, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..distributed import DistEnv, cleanup, init_distributed
from ..errors import ConfigError
from .data import EvalImageFolder, eval_loader, split_pair
from .features import extract_features
from .model import EvalModel, add_model_arguments, model_from_args
from .transforms import eval_transform

__all__ = ["add_data_arguments", "evaluation_setup", "features_of", "prepare_output", "write_json"]


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """--train-data / --val-data and the loader options, plus the model options."""
    p.add_argument("--train-data", metavar="DIR", required=True,
                   help="ImageFolder of labelled training images (a `make-dataset` directory means its train/)")
    p.add_argument("--val-data", metavar="DIR", required=True,
                   help="ImageFolder of validation images, same class names (a `make-dataset` directory means "
                        "its val/)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass and process (default 128)")
    p.add_argument("--num-workers", type=int, default=2, help="data-loading workers per process (default 2)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_arguments(p)


def evaluation_setup(args: argparse.Namespace, outputs: dict[str, str | None] | None = None
                     ) -> tuple[DistEnv, EvalModel, EvalImageFolder, EvalImageFolder]:
    """Process group (under torchrun), the frozen backbone, and the two datasets at the model's crop size.

    First, before anything is computed: the loader options are checked, and every ``outputs`` path (option ->
    path or None) is checked to be writable, so a bad ``--json`` fails now rather than after the features."""
    if args.batch_size < 1 or args.num_workers < 0:
        raise ConfigError(f"--batch-size must be >= 1 and --num-workers >= 0, got {args.batch_size} and "
                          f"{args.num_workers}")
    for option, path in (outputs or {}).items():
        if path:
            prepare_output(path, option)
    env = init_distributed(args.device)
    try:
        model = model_from_args(args, env.device)
        train, val = split_pair(args.train_data, args.val_data, eval_transform(model.crop_size))
    except BaseException:
        cleanup()
        raise
    return env, model, train, val


def features_of(fn: Callable[[torch.Tensor], torch.Tensor], dataset: EvalImageFolder, env: DistEnv,
                args: argparse.Namespace, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of ``dataset`` (this rank's shard, gathered) in dataset order, and its labels."""
    loader = eval_loader(dataset, args.batch_size, args.num_workers, env.rank, env.world_size,
                         pin_memory=env.device.type == "cuda")
    return extract_features(fn, loader, env.device, len(dataset), progress=env.is_main and not args.no_progress,
                            desc=desc)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def prepare_output(path: str | os.PathLike, option: str) -> None:
    """Create the missing parent directories of output file ``path`` and check that it can be written, so
    that a bad path fails at once (ConfigError naming ``option``), not after minutes of computing."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{option} {p} is a directory; give a file path")
    for parent in p.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"cannot write {option} {p}: {parent} is a file, not a directory")
            break
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p.parent, prefix=f".{p.name}.", suffix=".probe"):
            pass
        if p.exists() and not os.access(p, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise ConfigError(f"cannot write {option} {p}: {exc.strerror or exc}; choose a writable path") from None
