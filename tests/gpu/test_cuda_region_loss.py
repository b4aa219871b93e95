"""CUDA region loss (esvit_cuda::region_loss_fwd / _bwd) on a GPU against the reference: loss and student
gradient for fp32 / fp16 / bf16 logits, K up to 65536 and odd K (scalar loads), peaked and near-uniform
teacher distributions, int32 / int64 matches, a (1, K) center of another dtype, mixed student / teacher
dtypes; determinism, opcheck, torch.compile(fullgraph=True). Skipped without a GPU or the extension.

Tolerances: max abs error relative to the reference's max magnitude, 2e-5 for fp32 inputs and 1e-4 for half
inputs (the kernel reads the same rounded values and works in fp32; only the gradient's final rounding to the
student dtype is added, so half gradients get the dtype's rounding, 4e-3 / 8e-3)."""

from __future__ import annotations

import importlib

import pytest
import torch

import esvit_kernels as ek
from esvit_kernels import reference as R

pytestmark = pytest.mark.skipif(not ek.available_backends()["cuda"].available,
                                reason=f"cuda backend unavailable: {ek.available_backends()['cuda'].reason}")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOSS_TOL = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 8e-3}


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _run(b, ts, tt, k, dtype, spread=1.0, match_dtype=torch.int64, center_shape=None, teacher_dtype=None):
    s = (torch.randn(b, ts, k, device="cuda") * spread).to(dtype).requires_grad_()
    t = (torch.randn(b, tt, k, device="cuda") * spread).to(teacher_dtype or dtype)
    m = torch.randint(0, tt, (b, ts), device="cuda", dtype=match_dtype)
    c = torch.randn(*(center_shape or (k,)), device="cuda") * 0.1 * spread
    if teacher_dtype is None:
        loss = ek.region_loss(s, t, m, c, student_temp=0.1, teacher_temp=0.04, backend="cuda")
    else:  # the op takes mixed dtypes (compared in float32); the public API may insist on one dtype
        loss = importlib.import_module("esvit_kernels.ops.cuda_losses").get("region_loss")(s, t, m, c, 0.1, 0.04)
    (grad,) = torch.autograd.grad(loss * 3.0, s)
    s32 = s.detach().float().requires_grad_()
    ref = R.region_loss(s32, t.float(), m, c, 0.1, 0.04)
    (want,) = torch.autograd.grad(ref * 3.0, s32)
    return loss, ref, grad, want


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(4, 49, 49, 65536), (8, 9, 49, 4096), (2, 7, 5, 1000), (3, 1, 1, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_region_loss(shape, dtype):
    dt = DTYPES[dtype]
    loss, ref, grad, want = _run(*shape, dt)
    assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == dt
    assert _rel(loss, ref) <= LOSS_TOL[dt]
    assert _rel(grad, want) <= GRAD_TOL[dt]


@pytest.mark.parametrize("spread", [0.01, 8.0], ids=["near_uniform", "peaked"])
def test_region_loss_regimes(spread):
    loss, ref, grad, want = _run(2, 49, 49, 65536, torch.float32, spread=spread)
    assert _rel(loss, ref) <= 2e-5 and _rel(grad, want) <= 2e-5


def test_region_loss_int32_match_center_row_and_mixed_dtypes():
    loss, ref, grad, want = _run(2, 9, 49, 2048, torch.bfloat16, match_dtype=torch.int32, center_shape=(1, 2048),
                                 teacher_dtype=torch.float16)
    assert _rel(loss, ref) <= 1e-4 and _rel(grad, want) <= 8e-3


def test_region_loss_deterministic_opcheck_compile():
    fn = importlib.import_module("esvit_kernels.ops.cuda_losses").get("region_loss")
    s = torch.randn(2, 9, 512, device="cuda", requires_grad=True)
    t = torch.randn(2, 49, 512, device="cuda")
    m = torch.randint(0, 49, (2, 9), device="cuda")
    c = torch.randn(512, device="cuda")
    runs = [torch.autograd.grad(l_, s)[0] for l_ in (fn(s, t, m, c, 0.1, 0.04) for _ in range(2))]
    assert torch.equal(runs[0], runs[1])
    torch.library.opcheck(torch.ops.esvit_cuda.region_loss_fwd.default, (s, t, m, c, 0.1, 0.04))
    f = torch.compile(lambda *a: ek.region_loss(*a, student_temp=0.1, teacher_temp=0.04, backend="cuda"),
                      fullgraph=True)
    loss = f(s, t, m, c)
    torch.testing.assert_close(loss, R.region_loss(s, t, m, c, 0.1, 0.04), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], runs[0], rtol=1e-5, atol=1e-7)


def test_sanitizer_region_loss():
    """Small case for csrc/tests/sanitize.sh (odd K: scalar loads)."""
    loss, ref, grad, want = _run(2, 5, 7, 1003, torch.float16)
    assert _rel(loss, ref) <= 1e-4 and _rel(grad, want) <= 4e-3
