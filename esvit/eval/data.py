"""Labelled image folders for evaluation: split resolution, class alignment, rank sharding, clear errors.

An evaluation directory is an ImageFolder (``DIR/<class>/<image>``). A directory written by ``esvit
make-dataset`` (it holds ``esvit_dataset.json``) stands for its ``train`` split when given as training data
and for its ``val`` split when given as validation data. Validation classes are matched to the training
classes *by name*, so both folders may list them in any order and the validation set may lack some.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.datasets import load_rgb, scan_image_folder
from ..data.synthetic import META_FILE
from ..errors import DataError

__all__ = ["EvalImageFolder", "ShardSampler", "eval_loader", "resolve_split", "split_pair"]


def resolve_split(root: str | os.PathLike, split: str) -> Path:
    """``root`` itself, or ``root/split`` when ``root`` is a generated dataset (``esvit make-dataset``)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{split} data directory {root} does not exist")
    if (root / META_FILE).exists():
        if not (root / split).is_dir():
            hint = " (generate one with --val-fraction > 0)" if split == "val" else ""
            raise DataError(f"{root} is a generated dataset without a {split}/ split{hint}")
        return root / split
    return root


class EvalImageFolder(Dataset):
    """(image tensor, label, index) of every image of an ImageFolder; an unreadable image yields an ``error``.

    Args:
        class_names: label space to use (e.g. the training set's); a class directory not in it is an error.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable, class_names: list[str] | None = None) -> None:
        self.root = Path(root)
        samples, classes = scan_image_folder(self.root)
        if class_names is None:
            self.classes, self.samples = classes, samples
        else:
            unknown = sorted(set(classes) - set(class_names))
            if unknown:
                raise DataError(f"{self.root} has classes the training set lacks: {', '.join(unknown[:5])}"
                                + (" ..." if len(unknown) > 5 else "") + "; both folders need the same class names")
            remap = [class_names.index(c) for c in classes]
            self.classes, self.samples = list(class_names), [(p, remap[y]) for p, y in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([y for _, y in self.samples], dtype=torch.long)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        try:
            img = load_rgb(path)
        except DataError as exc:
            return {"error": str(exc)}
        return {"image": self.transform(img), "label": label, "index": index}


def _collate(items: list[dict]) -> dict:
    errors = [it["error"] for it in items if "error" in it]
    if errors:
        raise DataError(errors[0])
    return {"image": torch.stack([it["image"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: every sample exactly once over all ranks, no padding."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """Loader over this rank's shard of ``dataset`` (batches of dicts: image, label, index)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      num_workers=num_workers, collate_fn=_collate, pin_memory=pin_memory)


def split_pair(train_dir: str | os.PathLike, val_dir: str | os.PathLike, transform: Callable
               ) -> tuple[EvalImageFolder, EvalImageFolder]:
    """The training and validation folders, the validation labels aligned to the training classes."""
    train = EvalImageFolder(resolve_split(train_dir, "train"), transform)
    val = EvalImageFolder(resolve_split(val_dir, "val"), transform, class_names=train.classes)
    return train, val
