"""DINO / EsViT multi-crop augmentation (numbers from DESIGN.md section 2).

Global crops: RandomResizedCrop (scale (0.4, 1), bicubic), horizontal flip, colour jitter (0.4, 0.4, 0.2,
0.1) with p 0.8, grayscale p 0.2, then Gaussian blur p 1.0 on the first, blur p 0.1 + solarize p 0.2 on
the second. Local crops: RandomResizedCrop (scale (0.05, 0.4)), the same flip / jitter / grayscale, blur
p 0.5. ``blur=False`` / ``solarize=False`` drop those two (e.g. for tiny crops). ImageNet mean / std.
All randomness comes from torch's RNG, so seeding it per sample makes a sample's crops a pure function of
the seed (see :class:`esvit.data.datasets.ImageDataset`).
"""

from __future__ import annotations

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "GaussianBlur", "MultiCropAugmentation", "Solarization"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """PIL Gaussian blur with probability ``p`` and a radius uniform in [radius_min, radius_max]."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class Solarization:
    """PIL solarize (threshold 128) with probability ``p``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if torch.rand(()).item() < self.p else img


class MultiCropAugmentation:
    """PIL image -> [global_1, global_2, local_1, ..., local_n] normalised tensors."""

    def __init__(
        self, global_size: int = 224, local_size: int = 96, global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4), local_number: int = 8, blur: bool = True,
        solarize: bool = True,
    ) -> None:
        bicubic = T.InterpolationMode.BICUBIC
        flip_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        b = 1.0 if blur else 0.0
        self.global_1 = T.Compose([T.RandomResizedCrop(global_size, scale=tuple(global_scale), interpolation=bicubic),
                                   flip_jitter, GaussianBlur(1.0 * b), normalize])
        self.global_2 = T.Compose([T.RandomResizedCrop(global_size, scale=tuple(global_scale), interpolation=bicubic),
                                   flip_jitter, GaussianBlur(0.1 * b), Solarization(0.2 if solarize else 0.0),
                                   normalize])
        self.local = T.Compose([T.RandomResizedCrop(local_size, scale=tuple(local_scale), interpolation=bicubic),
                                flip_jitter, GaussianBlur(0.5 * b), normalize])
        self.local_number = local_number

    @property
    def num_crops(self) -> int:
        return 2 + self.local_number

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_1(img), self.global_2(img)]
        crops.extend(self.local(img) for _ in range(self.local_number))
        return crops
