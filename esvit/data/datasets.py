"""Image folders for pretraining: scanning with clear errors, per-sample deterministic multi-crop, a sampler
whose global batches do not depend on the number of processes, and a collate that reports bad images.

Determinism: a sample's crops are a pure function of (seed, epoch, index) -- torch's RNG is seeded per
sample inside a forked RNG scope -- and the sampler's order a pure function of (seed, epoch). So one process
with batch 2B sees exactly the images and crops two processes with batch B see together, data-loader
workers change nothing, and a run resumed in the middle of an epoch continues with the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..errors import DataError
from .synthetic import META_FILE

__all__ = ["IMG_EXTENSIONS", "Batch", "GlobalBatchSampler", "ImageDataset", "collate_crops", "load_rgb",
           "scan_image_folder", "to_rgb"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _bit_depth(img: Image.Image) -> int:
    """Value bits of a high-bit-depth greyscale image: a TIFF's BitsPerSample (e.g. 12 or 32; one less when its
    SampleFormat is signed), else 16 (PNG and PGM/PPM store at most 16; Pillow scales a PGM's maxval to 16 bits)."""
    tags = getattr(img, "tag_v2", {})

    def first(tag: int) -> int | None:
        v = tags.get(tag)
        return int(v[0] if isinstance(v, tuple) else v) if v else None

    bits = first(258) or 16  # BitsPerSample
    return bits - 1 if first(339) == 2 else bits  # SampleFormat 2: signed integers


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. ``convert("RGB")`` clips 16- and 32-bit greyscale (modes I;16*, I) at 255, which
    turns them white, so those are scaled by their bit depth (value >> (bits - 8)); floating-point images (F)
    have no defined range and are refused, as are negative or out-of-depth values. Every other mode (1, L, P,
    LA, PA, RGBA, CMYK, YCbCr, ...) goes through PIL's own conversion. Raises DataError."""
    if img.mode == "RGB":
        return img
    if img.mode == "F":
        raise DataError("32-bit floating-point pixels (PIL mode F) have no defined range; save the image as 8- or "
                        "16-bit")
    if img.mode == "I" or img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.int64)
        bits = _bit_depth(img)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi >> bits:
            raise DataError(f"greyscale pixels (PIL mode {img.mode}) range over [{lo}, {hi}], outside the "
                            f"[0, {(1 << bits) - 1}] of their bit depth; save the image as 8- or 16-bit unsigned")
        a = a >> (bits - 8) if bits >= 8 else a << (8 - bits)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:  # e.g. premultiplied La
        raise DataError(f"cannot convert PIL mode {img.mode} to RGB ({exc})") from None


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path`` as 8-bit RGB (:func:`to_rgb`) -- the one loader of pretraining, evaluation
    and the pictures. Raises DataError naming the file when it is missing, undecodable or of a refused mode."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # decode now: the file closes on return
        return to_rgb(img)
    except FileNotFoundError:
        raise DataError(f"no such image: {path}") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not a valid image file (corrupt or unknown format)") from None
    except DataError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    except Exception as exc:  # PIL raises many types for truncated / broken files
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


def scan_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) of every image under ``root`` and the class names.

    ``root/<class>/**/<image>`` as torchvision's ImageFolder (labels = sorted class directories); images
    directly in ``root`` get label 0 when there are no class directories. A directory written by
    ``esvit make-dataset`` (it holds ``esvit_dataset.json``) means its ``train`` split.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a directory")
    if (root / META_FILE).exists() and (root / "train").is_dir():
        root = root / "train"
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot read data directory {root}: {exc.strerror or exc}") from exc
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    samples: list[tuple[str, int]] = []
    errors: list[str] = []

    def onerror(exc: OSError) -> None:
        errors.append(f"{exc.filename}: {exc.strerror}")

    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / cls, onerror=onerror, followlinks=True):
            dirnames.sort()
            samples.extend((os.path.join(dirpath, f), label) for f in sorted(filenames)
                           if f.lower().endswith(IMG_EXTENSIONS))
    if not classes:
        samples = [(e.path, 0) for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
        classes = [root.name]
    if errors:
        raise DataError(f"cannot read part of data directory {root}: {'; '.join(errors[:3])}")
    if not samples:
        raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root}; expected "
                        f"{root}/<class>/<image> (an ImageFolder) or images directly in {root}")
    return samples, classes


class ImageDataset(Dataset):
    """Images of a folder through a multi-crop ``transform``; a sample is a dict with ``crops``, ``label``,
    ``index`` -- or ``error`` (a message naming the file) when the image cannot be decoded."""

    def __init__(self, root: str | os.PathLike, transform: Callable, seed: int = 0) -> None:
        self.root = str(root)
        self.samples, self.classes = scan_image_folder(root)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_seed(self, index: int) -> int:
        return hash((self.seed, self.epoch, int(index))) & 0x7FFF_FFFF_FFFF_FFFF

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        try:
            img = load_rgb(path)
        except DataError as exc:
            return {"error": str(exc), "index": index}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.sample_seed(index))
            crops = self.transform(img)
        return {"crops": crops, "label": label, "index": index}


@dataclass
class Batch:
    """A collated batch: ``crops[i]`` is (B, 3, H_i, W_i); ``errors`` lists unreadable images (then crops=[])."""

    crops: list[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    errors: list[str]

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``) for faster copies to the GPU."""
        return Batch([c.pin_memory() for c in self.crops], self.labels, self.indices, self.errors)


def collate_crops(items: list[dict]) -> Batch:
    errors = [it["error"] for it in items if "error" in it]
    indices = torch.tensor([it["index"] for it in items])
    if errors:
        return Batch([], torch.empty(0, dtype=torch.long), indices, errors)
    n = len(items[0]["crops"])
    crops = [torch.stack([it["crops"][i] for it in items]) for i in range(n)]
    return Batch(crops, torch.tensor([it["label"] for it in items]), indices, [])


class GlobalBatchSampler(Sampler[int]):
    """Indices for one rank: step k of an epoch takes the global batch ``perm[k*G:(k+1)*G]`` of a permutation
    seeded by (seed, epoch), G = batch_size * world_size, and rank r reads its slice ``[r*B, (r+1)*B)``.
    The tail that does not fill a global batch is dropped. ``set_epoch(e, start_step)`` resumes mid-epoch."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.n, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_step = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        g_b, b = self.global_batch, self.batch_size
        for k in range(self.start_step, self.steps_per_epoch):
            start = k * g_b + self.rank * b
            yield from perm[start:start + b]

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0) * self.batch_size
