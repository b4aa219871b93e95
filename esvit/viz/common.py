"""What the picture commands share: the image at the model's crop size, the backbone, the common options."""

from __future__ import annotations

import argparse
import os

import torch

from ..data.datasets import load_rgb
from ..eval.model import EvalModel, add_model_arguments, model_from_args
from ..eval.transforms import eval_transform

__all__ = ["add_picture_arguments", "load_image", "model_and_image"]


def load_image(path: str | os.PathLike, crop: int) -> torch.Tensor:
    """An image file (:func:`esvit.data.datasets.load_rgb`) through the eval transform: (1, 3, crop, crop),
    normalised."""
    return eval_transform(crop)(load_rgb(path))[None]


def add_picture_arguments(p: argparse.ArgumentParser, panel: int) -> None:
    """--image, --output, --panel-size (default ``panel``) and the model options."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--output", required=True, metavar="OUT.png",
                   help="PNG to write (missing directories are created)")
    p.add_argument("--panel-size", type=int, default=panel, help=f"pixels per picture panel (default {panel})")
    add_model_arguments(p)


def model_and_image(args: argparse.Namespace) -> tuple[EvalModel, torch.Tensor]:
    """The backbone of the command line and ``--image`` at its crop size, both on ``--device``."""
    from ..distributed import resolve_device
    from ..errors import ConfigError
    from ..eval.runner import prepare_output

    if args.panel_size < 32:
        raise ConfigError("--panel-size must be >= 32")
    prepare_output(args.output, "--output")  # creates a missing directory; fails now if it cannot be written
    device = resolve_device(args.device)
    model = model_from_args(args, device)
    return model, load_image(args.image, model.crop_size).to(device)
