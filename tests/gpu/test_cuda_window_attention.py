"""CUDA C++ window attention (esvit_kernels._C) on a GPU against the eager reference: values and every
gradient (qkv / q, k, v, bias table, pad vector) for fp32 / fp16 / bf16 over the CPU test cases plus windows
2..14, head dims 6..128 (incl. the unaligned scalar path), padding in both roll orders, shift on one or both
axes and none, window = resolution and Swin stage shapes; the op contract (opcheck, lse), determinism of
the bias / pad gradients, torch.compile(fullgraph=True). Skipped without a GPU or without the extension.

Tolerances (conftest.TOL, max abs error relative to the reference's max magnitude): fp32 2e-5 for values and
gradients; fp16 4e-3 / bf16 3e-2 for values, twice that for gradients (the output is rounded before
D = rowsum(dO * O) and the half inputs carry their rounding into every product).

Under compute-sanitizer: ``csrc/tests/sanitize.sh`` runs the ``sanitizer`` tests below with memcheck,
racecheck, synccheck and initcheck.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import esvit_kernels as ek
from esvit_kernels import reference as R

from ..conftest import assert_close
from ..test_cuda_build import _reference_lse_map
from ..test_window_attention import MAP_CASES, WIN_CASES, _check, _run_map, _run_windows

pytestmark = pytest.mark.skipif(not ek.available_backends()["cuda"].available,
                                reason=f"cuda backend unavailable: {ek.available_backends()['cuda'].reason}")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (B, H, W, heads, head_dim, window, shift, roll_before_pad)
CUDA_MAP_CASES = dict(MAP_CASES)
CUDA_MAP_CASES.update({
    "w2_hd64_timm": (2, 5, 7, 2, 64, 2, 1, True),
    "w3_hd32_pad": (2, 10, 11, 3, 32, 3, 1, False),
    "w4_hd16_timm": (1, 9, 10, 2, 16, 4, 2, True),
    "w4_noshift_pad": (1, 9, 10, 2, 16, 4, 0, False),
    "w7_hd64_pad_timm": (2, 12, 17, 2, 64, 7, 3, True),
    "w12_hd32_pad": (1, 25, 13, 2, 32, 12, 6, False),
    "w14_hd64_pad_timm": (1, 15, 29, 1, 64, 14, 7, True),
    "w14_eq_res": (2, 14, 14, 2, 32, 14, 0, False),
    "shift_rows_only": (2, 9, 10, 2, 32, (4, 2), (3, 0), False),
    "shift_cols_only": (1, 8, 9, 2, 16, (2, 3), (0, 1), True),
    "hd6_unaligned": (1, 8, 8, 2, 6, 4, 2, False),  # rows not 16-byte aligned: scalar loads / stores
    "hd48": (1, 9, 9, 2, 48, 3, 1, True),
    "hd128": (1, 7, 7, 1, 128, 7, 3, False),
    "swinT_s1": (4, 56, 56, 3, 32, 7, 3, False),
    "swinT_s1_b16": (16, 56, 56, 3, 32, 7, 3, False),  # several windows per backward block
    "swinT_s4": (4, 7, 7, 24, 32, 7, 0, False),
    "swinT_local_s4": (8, 3, 3, 24, 32, 7, 0, False),
    "swinB_w14_s1": (2, 56, 56, 4, 32, 14, 7, False),
})

# (B*nW, nW, heads, head_dim, window, with mask)
CUDA_WIN_CASES = dict(WIN_CASES)
CUDA_WIN_CASES.update({
    "w2_hd64_mask": (16, 4, 2, 64, 2, True),
    "w4_hd6_mask": (8, 2, 2, 6, 4, True),
    "w12_mask": (4, 4, 2, 32, 12, True),
    "w7_hd128": (4, 2, 1, 128, 7, True),
})


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CUDA_MAP_CASES))
def test_shifted(case, dtype):
    _check(*_run_map(case, DTYPES[dtype], device="cuda", cases=CUDA_MAP_CASES, backend="cuda"), DTYPES[dtype])


@pytest.mark.parametrize("case", ["pad_official", "pad_timm", "swin_shifted"])
def test_shifted_without_bias_or_pad(case):
    out = _run_map(case, torch.float32, with_bias=False, with_pad=False, device="cuda", backend="cuda")
    _check(*out, torch.float32)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CUDA_WIN_CASES))
def test_windows(case, dtype):
    _check(*_run_windows(case, DTYPES[dtype], device="cuda", cases=CUDA_WIN_CASES, backend="cuda"), DTYPES[dtype])


def test_mixed_dtypes_bias_and_mask():
    """bf16 q/k/v with a bf16 table and an fp16 mask (any float dtypes are read as they are)."""
    bw, heads, hd, ws = 8, 2, 32, (7, 7)  # the mask of a 14x14 map: nW = 4
    q, k, v = (torch.randn(bw, heads, 49, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    table = torch.randn(169, heads, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = R.shift_mask((14, 14), ws, (3, 3), device="cuda", dtype=torch.float16)
    out = ek.window_attention(q, k, v, window_size=ws, bias_table=table, mask=mask, backend="cuda")
    ins = [t.detach().float().requires_grad_() for t in (q, k, v, table)]
    ref = R.window_attention(*ins[:3], ws, ins[3], mask.float())
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v, table), grad.bfloat16())
    want = torch.autograd.grad(ref, ins, grad)
    assert_close(out, ref, torch.bfloat16, "out")
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dbias")):
        assert g.dtype == torch.bfloat16
        assert_close(g, w, torch.bfloat16, name, factor=2.0)


def test_lse_matches_the_contract():
    """lse (B*nW, heads, N), windows numbered (b, window row, window col) over the padded shifted map."""
    b, h, w, heads, hd, ws, ss = 2, 10, 13, 2, 16, (4, 4), (2, 2)
    qkv = torch.randn(b, h, w, 3 * heads * hd, device="cuda")
    table = torch.randn(49, heads, device="cuda")
    pad = torch.randn(3 * heads * hd, device="cuda")
    ops = importlib.import_module("esvit_kernels.ops.window_attention")._cuda_ops()
    for rbp in (False, True):
        _, lse = ops.swa_fwd(qkv, table, pad, heads, *ws, *ss, hd**-0.5, rbp)
        want = _reference_lse_map(qkv.cpu().double(), heads, ws, ss, table.cpu().double(), hd**-0.5,
                                  pad.cpu().double(), rbp)
        torch.testing.assert_close(lse.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_bias_and_pad_gradients_are_deterministic():
    qkv = torch.randn(8, 57, 57, 288, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    table = torch.randn(169, 3, device="cuda", requires_grad=True)
    pad = torch.randn(288, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    runs = []
    for _ in range(3):
        out = ek.shifted_window_attention(qkv, num_heads=3, window_size=7, shift_size=3, bias_table=table,
                                          pad_qkv=pad, backend="cuda")
        runs.append(torch.autograd.grad(out.float().square().sum(), (qkv, table, pad)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_opcheck():
    """Schema, fake impl, autograd registration and AOT dispatch of the custom ops (torch.library.opcheck)."""
    ops = importlib.import_module("esvit_kernels.ops.window_attention")._cuda_ops()
    qkv = torch.randn(2, 9, 10, 48, device="cuda", requires_grad=True)
    table = torch.randn(25, 2, device="cuda", requires_grad=True)
    pad = torch.randn(48, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.swa_fwd.default, (qkv, table, pad, 2, 3, 3, 1, 1, 0.25, False))
    q = torch.randn(6, 2, 12, 16, device="cuda", requires_grad=True)
    mask = torch.zeros(3, 12, 12, device="cuda")
    torch.library.opcheck(ops.wa_fwd.default, (q, q.detach().clone(), q.detach().clone(), None, mask, 3, 4, 0.25))


@pytest.mark.parametrize("layout", ["map", "windows"])
def test_compile_fullgraph(layout):
    qkv = torch.randn(2, 14, 14, 96, device="cuda", requires_grad=True)
    table = torch.randn(169, 2, device="cuda", requires_grad=True)

    def f(x, t):
        if layout == "map":
            out = ek.shifted_window_attention(x, num_heads=2, window_size=7, shift_size=3, bias_table=t,
                                              backend="cuda")
        else:
            q, k, v = R.window_partition(x, (7, 7)).view(-1, 49, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
            out = ek.window_attention(q, k, v, window_size=7, bias_table=t, backend="cuda")
        return out.square().sum()

    loss = torch.compile(f, fullgraph=True)(qkv, table)
    got = torch.autograd.grad(loss, (qkv, table))
    want_loss = f(qkv, table)
    want = torch.autograd.grad(want_loss, (qkv, table))
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


SANITIZER_MAP = ["pad_official", "pad_timm", "w2_packed", "w14_split", "hd6_unaligned", "hd128"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", SANITIZER_MAP)
def test_sanitizer_map(case, dtype):
    """Small cases run under compute-sanitizer by csrc/tests/sanitize.sh (also plain tests)."""
    _check(*_run_map(case, DTYPES[dtype], device="cuda", cases=CUDA_MAP_CASES, backend="cuda"), DTYPES[dtype])


@pytest.mark.parametrize("case", ["w3_packed_mask", "w4_hd6_mask", "w14"])
def test_sanitizer_windows(case):
    _check(*_run_windows(case, torch.float16, device="cuda", cases=CUDA_WIN_CASES, backend="cuda"), torch.float16)
