"""Data for pretraining: multi-crop augmentation, image folders, the generated embedded dataset."""

from .augment import MultiCropAugmentation
from .datasets import Batch, GlobalBatchSampler, ImageDataset, collate_crops, scan_image_folder
from .synthetic import ensure_embedded, make_dataset, render_image

__all__ = [
    "Batch",
    "GlobalBatchSampler",
    "ImageDataset",
    "MultiCropAugmentation",
    "collate_crops",
    "ensure_embedded",
    "make_dataset",
    "render_image",
    "scan_image_folder",
]
