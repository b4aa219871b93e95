"""Shared fixtures of the evaluation / visualisation tests: a tiny checkpoint and a tiny labelled dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esvit.checkpoint import FORMAT, VERSION
from esvit.config import load_config, validate
from esvit.data.synthetic import make_dataset
from esvit.models import create_backbone
from tests.esvit_helpers import one_thread  # noqa: F401  (fixture, re-exported for the eval / viz tests)

# swin_micro at 32 px: 8x8 -> 4x4 -> 2x2 tokens; the last stage is one 2x2 window
TINY_MODEL = ["model.arch=swin_micro", "model.window_size=4", "model.backend=torch", "data.global_crop_size=32",
              "data.local_crop_size=16"]


def save_checkpoint(path: Path, *overrides: str, backbone: torch.nn.Module | None = None, seed: int = 1) -> Path:
    """A checkpoint in the ``esvit pretrain`` format holding only what evaluation reads (config, backbones).

    ``backbone`` replaces the weights the config describes (to fake a checkpoint of another architecture).
    """
    cfg = validate(load_config(None, [*TINY_MODEL, *overrides]))
    m = cfg["model"]
    if backbone is None:
        torch.manual_seed(seed)
        kwargs = {"patch_size": m["patch_size"]} if m["arch"] in ("deit_small", "vit_base") else {}
        backbone = create_backbone(m["arch"], window_size=m["window_size"], img_size=cfg["data"]["global_crop_size"],
                                   backend="torch", drop_path_rate=0.0, **kwargs)
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"format": FORMAT, "version": VERSION, "config": cfg, "epoch": 1, "teacher": sd, "student": sd}, path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pth")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """4 classes, 48 images of 48 px, a quarter held out in val/."""
    root = tmp_path_factory.mktemp("data") / "ds"
    make_dataset(root, 48, 4, val_fraction=0.25, image_size=48, seed=0)
    return root


def broken_checkpoints(root: Path, good: Path) -> dict[str, Path]:
    """Variants of the checkpoint ``good`` that evaluation must refuse: no stored config, an unknown stored
    arch, a config without its model section, NaN teacher weights."""
    state = torch.load(good, weights_only=True)
    cfg = state["config"]
    variants = {
        "no_config": {k: v for k, v in state.items() if k != "config"},
        "unknown_arch": state | {"config": cfg | {"model": cfg["model"] | {"arch": "swin_huge"}}},
        "no_model_section": state | {"config": {"data": cfg["data"]}},
        "nan_teacher": state | {"teacher": {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                            for k, v in state["teacher"].items()}},
    }
    paths = {}
    for name, s in variants.items():
        paths[name] = root / f"{name}.pth"
        torch.save(s, paths[name])
    return paths


BROKEN_MESSAGES = {
    "no_config": "has no stored config",
    "unknown_arch": "unknown architecture 'swin_huge'",
    "no_model_section": "has no stored config",
    "nan_teacher": "teacher weights in .* are not finite",
}
