"""Shared settings of the esvit training tests: the tiny preset on a small generated dataset."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from esvit.config import load_config, validate

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "model.arch=swin_micro", "model.window_size=4", "model.backend=torch", "loss.backend=torch",
    "head.out_dim=256", "head.hidden_dim=64", "head.bottleneck_dim=32",
    "data.path=embedded", "data.embedded_images=64", "data.embedded_classes=4", "data.embedded_image_size=48",
    "data.global_crop_size=32", "data.local_crop_size=16", "data.local_crops_number=2", "data.num_workers=0",
    "optim.batch_size=16", "optim.epochs=8", "optim.lr=0.005", "optim.warmup_epochs=1", "optim.momentum_teacher=0.99",
    "loss.warmup_teacher_temp_epochs=0", "loss.teacher_temp=0.04", "train.progress=false", "train.device=cpu",
]


def tiny_config(output: Path, cache: Path, *overrides: str) -> dict:
    return validate(load_config(None, [*TINY, f"data.cache_dir={cache}", f"train.output={output}", *overrides]))


def tiny_args(output: Path, cache: Path, *overrides: str) -> list[str]:
    """The same run as ``esvit pretrain`` arguments."""
    return ["pretrain", "--output", str(output), *TINY, f"data.cache_dir={cache}", *overrides]


def subprocess_env() -> dict[str, str]:
    """Environment for `python -m esvit` / torchrun children: this worktree first on the path, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


PYTHON = sys.executable


def state_equal(a: dict, b: dict) -> list[str]:
    """Names of the tensors that differ between two state dicts (same keys expected)."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (these small models run faster so, and the machine is shared); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A per-module cache directory for the embedded dataset."""
    return tmp_path_factory.mktemp("esvit_cache")
