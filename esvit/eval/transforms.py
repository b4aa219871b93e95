"""Evaluation transforms: the paper's Resize(256) bicubic + CenterCrop(224), scaled to the model's crop size.

A model pretrained with global crops of ``crop`` pixels is evaluated at that size: Resize(int(crop * 256 /
224)) then CenterCrop(crop) (256/224 keeps the paper's border ratio), ImageNet mean / std.
"""

from __future__ import annotations

import torch
from torchvision import transforms as T

from ..data.augment import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["denormalize", "eval_transform", "resize_size"]


def resize_size(crop: int) -> int:
    """Shorter-side size before the centre crop (256 for a 224 crop)."""
    return int(crop * 256 / 224)


def eval_transform(crop: int) -> T.Compose:
    """PIL image -> normalised (3, crop, crop) tensor: Resize(crop*256/224) bicubic, CenterCrop(crop)."""
    return T.Compose([
        T.Resize(resize_size(crop), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(crop),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the ImageNet normalisation: (..., 3, H, W) -> values in [0, 1] (clamped)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)
