"""EsViT pretraining on a GPU: a tiny run on the fused Triton kernels with ``train.deterministic: true`` (cuBLAS
needs its workspace configured before first use) runs to the end, twice with bitwise-equal weights."""

from __future__ import annotations

import subprocess

import pytest
import torch

from esvit.checkpoint import load_checkpoint

from ..esvit_helpers import PYTHON, REPO, TINY, subprocess_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(out, cache) -> dict:
    args = [a for a in TINY if not a.startswith(("train.device", "model.backend", "loss.backend", "optim.epochs"))]
    cmd = [PYTHON, "-m", "esvit", "pretrain", "--output", str(out), *args, f"data.cache_dir={cache}",
           "train.device=cuda", "model.backend=triton", "loss.backend=triton", "optim.epochs=1",
           "train.deterministic=true"]
    env = subprocess_env()
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_checkpoint(out / "checkpoint.pth")


def test_deterministic_pretraining_on_gpu(tmp_path):
    a = _run(tmp_path / "a", tmp_path / "cache")
    b = _run(tmp_path / "b", tmp_path / "cache")
    for key in ("student", "teacher"):
        diff = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not diff, f"{key}: {len(diff)} tensors differ, e.g. {diff[:3]}"
