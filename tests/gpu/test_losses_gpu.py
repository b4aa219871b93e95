"""Fused losses compiled on a GPU at EsViT's real shapes (Swin-T: 49 global / 9 local region tokens,
K = 65536, up to 32 images, bf16) against the eager reference, plus peak memory and timing.

Needs CUDA and compiled Triton (TRITON_INTERPRET unset): ``pytest -s tests/gpu/test_losses_gpu.py``.
Tolerances as in ``tests/test_losses.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

import esvit_kernels as ek

from ..conftest import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="GPU tests run compiled Triton: unset TRITON_INTERPRET"),
]

K = 65536
ST, TT = 0.1, 0.04
LOSS_TOL = 2e-5
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}
DEV = "cuda"


def _close(a, b, tol, name):
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    e = rel_err(a, b)
    assert e <= tol, f"{name}: relative error {e:.3g} > {tol:.3g}"


def _swin_t(b: int, dtype=torch.bfloat16, d: int = 768):
    """Region-head logits and backbone tokens of 2 global (49 tokens) + 8 local (9 tokens) crops."""
    g = torch.Generator(device=DEV).manual_seed(0)
    rnd = lambda *shape: (torch.randn(*shape, device=DEV, generator=g) * 3).to(dtype)  # noqa: E731
    sl = [rnd(2, b, 49, K), rnd(8, b, 9, K)]
    sf = [rnd(2, b, 49, d), rnd(8, b, 9, d)]
    return sl, sf, rnd(2, b, 49, K), rnd(2, b, 49, d), torch.randn(1, K, device=DEV, generator=g)


def _run_multi(backend, sl, sf, tl, tf, c):
    leaves = [x.detach().clone().requires_grad_(True) for x in sl]
    loss, mean = ek.multi_region_loss(leaves, sf, tl, tf, c, student_temp=ST, teacher_temp=TT,
                                      return_teacher_mean=True, backend=backend)
    loss.backward()
    return loss.detach(), mean, [x.grad for x in leaves]


@pytest.mark.parametrize("b", [4, 32])
def test_multi_region_loss_swin_t(b):
    sl, sf, tl, tf, c = _swin_t(b)
    v, mean, grads = _run_multi("triton", sl, sf, tl, tf, c)
    v_ref, mean_ref, grads_ref = _run_multi("torch", sl, sf, tl, tf, c)
    _close(v, v_ref, LOSS_TOL, "loss")
    _close(mean, mean_ref, 1e-5, "teacher mean")
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref, GRAD_TOL[torch.bfloat16], "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dino_loss_swin_t(dtype):
    s = (torch.randn(10, 32, K, device=DEV) * 3).to(dtype).requires_grad_(True)
    t = (torch.randn(2, 32, K, device=DEV) * 3).to(dtype)
    c = torch.randn(K, device=DEV)
    out = []
    for backend in ("triton", "torch"):
        s.grad = None
        loss = ek.dino_loss(s, t, c, student_temp=ST, teacher_temp=TT, backend=backend)
        loss.backward()
        out.append((loss.detach(), s.grad.clone()))
    _close(out[0][0], out[1][0], LOSS_TOL, "loss")
    _close(out[0][1], out[1][1], GRAD_TOL[dtype], "grad")


def test_region_loss_fp32_extreme_logits_k65536():
    s = torch.randn(2, 49, K, device=DEV) * 3e3
    t = torch.randn(2, 9, K, device=DEV) * 3e3
    m = torch.randint(0, 9, (2, 49), device=DEV)
    c = torch.randn(K, device=DEV)
    out = []
    for backend in ("triton", "torch"):
        x = s.clone().requires_grad_(True)
        loss = ek.region_loss(x, t, m, c, student_temp=0.04, teacher_temp=0.04, backend=backend)
        loss.backward()
        out.append((loss.detach(), x.grad))
    _close(out[0][0], out[1][0], LOSS_TOL, "loss")
    _close(out[0][1], out[1][1], GRAD_TOL[torch.float32], "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_region_match_ties_on_gpu(dtype):
    """Exact duplicates (also in a later 32-token block and 2x scaled) must resolve to the lowest index
    with the compiled reduction too."""
    t = torch.randn(32, 49, 768, device=DEV)
    t[:, 40] = t[:, 3]
    t[:, 7] = 2 * t[:, 3]
    s = torch.randn(32, 9, 768, device=DEV)
    s[:, 0] = t[:, 3]
    s[:, 5] = s[:, 0]
    s, t = s.to(dtype), t.to(dtype)
    idx = ek.region_match(s, t, backend="triton")
    assert (idx[:, 0] == 3).all() and (idx[:, 5] == 3).all()
    ref = ek.region_match(s, t, backend="torch")
    assert (idx == ref).float().mean() > 0.999  # random rows: only near-ties may differ by rounding


def test_compile_inductor_fullgraph():
    sl, sf, tl, tf, c = _swin_t(4)

    def step(sl0, sl1, sf0, sf1, tl, tf, c):
        return ek.multi_region_loss([sl0, sl1], [sf0, sf1], tl, tf, c, student_temp=ST, teacher_temp=TT,
                                    backend="triton")

    compiled = torch.compile(step, fullgraph=True)
    leaves = [x.detach().clone().requires_grad_(True) for x in sl]
    loss = compiled(*leaves, *sf, tl, tf, c)
    loss.backward()
    v, _, grads = _run_multi("triton", sl, sf, tl, tf, c)
    _close(loss.detach(), v, 1e-6, "loss")
    for g, gl in zip(grads, leaves):
        _close(gl.grad, g, 1e-6, "grad")


def _peak_and_time(backend, sl, sf, tl, tf, c, reps=3):
    """Peak memory above the inputs (bytes) and median forward+backward time (ms) of the multi-pair loss."""
    leaves = [x.detach().clone().requires_grad_(True) for x in sl]

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        loss = ek.multi_region_loss(leaves, sf, tl, tf, c, student_temp=ST, teacher_temp=TT, backend=backend)
        loss.backward()

    fwd_bwd()  # warm-up, compilation
    torch.cuda.synchronize()
    for x in leaves:
        x.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fwd_bwd()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return torch.cuda.max_memory_allocated() - base, sorted(times)[len(times) // 2]


def test_peak_memory_and_time_swin_t_b32():
    """The reference keeps fp32 (B, Ts, K) softmax/log-softmax/gathered copies per crop pair; the fused
    op keeps none. Both produce the same bf16 student-logit gradients (counted in the peak)."""
    sl, sf, tl, tf, c = _swin_t(32)
    grads = sum(x.numel() * x.element_size() for x in sl)
    fused_mem, fused_ms = _peak_and_time("triton", sl, sf, tl, tf, c)
    ref_mem, ref_ms = _peak_and_time("torch", sl, sf, tl, tf, c)
    print(f"\n{torch.cuda.get_device_name()}: multi_region_loss fwd+bwd, Swin-T B=32 K={K} bf16: "
          f"fused peak {fused_mem / 2**30:.2f} GiB {fused_ms:.2f} ms | reference peak {ref_mem / 2**30:.2f} GiB "
          f"{ref_ms:.2f} ms | student grads alone {grads / 2**30:.2f} GiB")
    assert fused_mem < grads * 1.1 + 64 * 2**20
    assert fused_mem * 3 < ref_mem


# ------------------------------------------------------------------------------------------ bad values, empty input


def _loss_backends():
    return ["triton"] + (["cuda"] if ek.available_backends()["cuda"].available else [])


def test_region_match_nan_gpu():
    from ..test_losses import check_region_match_nan

    check_region_match_nan(_loss_backends(), device="cuda")


def test_nan_gives_nonfinite_loss_gpu():
    from ..test_losses import check_nan_gives_nonfinite_loss

    check_nan_gives_nonfinite_loss(_loss_backends(), device="cuda")


def test_empty_inputs_gpu():
    from ..test_losses import check_empty_inputs

    check_empty_inputs(_loss_backends(), device="cuda")


def test_center_float64_gpu():
    from ..test_losses import check_center_float64

    check_center_float64(_loss_backends(), device="cuda")
