"""Compiled Triton neighbourhood (ViL) attention on a GPU against the reference: every CPU case plus the
ViL-2262 stage shapes at 224 px and 96-px local crops (small batches), all dtypes, values and every
gradient; determinism of the bias-table gradient; torch.compile with inductor."""

from __future__ import annotations

import pytest
import torch

import esvit_kernels as ek

from ..test_neighborhood_attention import CASES, _run, check

# (B, H, W, heads, head_dim, window, G, neighbor, exact): ViL-2262 stages 1-3 (stage 4 runs full attention)
GPU_CASES = dict(CASES)
GPU_CASES.update({
    "vil_s1": (2, 56, 56, 3, 32, 7, 1, 0, 0),
    "vil_s1_neighbor3": (2, 56, 56, 3, 32, 7, 1, 3, 0),
    "vil_s2": (2, 28, 28, 6, 32, 7, 1, 0, 0),
    "14x14_h12_neighbor8": (4, 14, 14, 12, 32, 7, 1, 8, 0),  # ViL-2262 runs stage 3 as full attention
    "vil_local_s1": (4, 24, 24, 3, 32, 7, 1, 0, 0),  # 96-px crop: 24 = 3.4 windows, padded
    "vil_local_s3": (4, 6, 6, 12, 32, 7, 1, 0, 0),
    "vil_s1_hd64_g2": (2, 56, 56, 2, 64, 7, 2, 0, 0),
})
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_neighborhood_gpu(case, dtype):
    torch.manual_seed(0)
    check(*_run(case, DTYPES[dtype], device="cuda", cases=GPU_CASES), DTYPES[dtype])


def test_neighborhood_bias_gradient_deterministic_gpu():
    torch.manual_seed(0)
    c = 96
    q, k, v = (torch.randn(8, 56, 56, c, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    gk, gv = (torch.randn(8, 1, c, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    table = torch.randn(27 * 27, 3, device="cuda", requires_grad=True)
    gbias = torch.randn(3, 1, device="cuda", requires_grad=True)
    grads = []
    for _ in range(3):
        out = ek.neighborhood_window_attention(q, k, v, 3, 7, gk, gv, table, gbias, backend="triton")
        grads.append(torch.autograd.grad(out.float().square().sum(), (table, gbias, gk, gv)))
    for a, b in zip(grads[0], grads[1]):
        assert torch.equal(a, b)
    for a, b in zip(grads[1], grads[2]):
        assert torch.equal(a, b)


def test_neighborhood_compile_inductor_gpu():
    torch.manual_seed(0)
    q = torch.randn(2, 14, 14, 64, device="cuda", requires_grad=True)
    g = torch.randn(2, 1, 64, device="cuda", requires_grad=True)
    table = torch.randn(27 * 27, 2, device="cuda", requires_grad=True)

    def f(x, gx, t):
        return ek.neighborhood_window_attention(x, x, x, 2, 7, gx, gx, t, backend="triton").square().sum()

    loss = torch.compile(f, fullgraph=True)(q, g, table)
    torch.testing.assert_close(loss, f(q, g, table), rtol=1e-4, atol=1e-4)
