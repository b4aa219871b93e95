"""Shared test helpers: seeded random tensors, tolerance tables, backend parametrisation."""

from __future__ import annotations

import os

import pytest
import torch

from esvit_kernels.backends import available_backends

# Per-dtype tolerances of a fused kernel against the fp32/fp64 reference (max abs error relative to the
# reference's max magnitude). fp32 is tight; half precisions carry bf16/fp16 rounding of inputs, of P
# before P@V, and of dS before the gradient matmuls.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 (NaN -> inf so it never passes)."""
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    out = err / max(scale, 1e-12)
    return float("inf") if out != out else out


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, name: str = "", factor: float = 1.0):
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    e = rel_err(a, b)
    assert e <= TOL[dtype] * factor, f"{name}: relative error {e:.3g} > {TOL[dtype] * factor:.3g} ({dtype})"


def triton_ok() -> bool:
    s = available_backends()["triton"]
    return s.available and "cpu" in s.devices


requires_triton = pytest.mark.skipif(
    not triton_ok(), reason="triton not installed or TRITON_INTERPRET!=1 (make test sets it)"
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, torch {torch.__version__}"
