"""ViL neighbourhood window attention: the eager reference against a brute-force per-query oracle written
from the semantics (map positions, not windows), the functional API's input checks, and the fused Triton
kernels (interpreter) against the reference: values and every gradient (q, k, v, global k / v, the local
bias table, the global bias) in fp32 tightly (conftest.TOL) and fp16 / bf16 with conftest.TOL (values) and
2 x TOL (gradients).

The reference itself was checked against the official ``Long2DSCSelfAttention`` (float64, max abs
difference 7e-16 over exact 0 / -1 / 1, neighbor 0 / -1 / 1 / 3 / 4 / 5 / 8, 0-2 global tokens, maps
smaller than one window up to 13 wide): see docs/kernel_notes.md."""

from __future__ import annotations

import pytest
import torch

import esvit_kernels as ek
from esvit_kernels import reference as R
from esvit_kernels.backends import BackendUnavailableError

from .conftest import assert_close, requires_triton

# ------------------------------------------------------------------------------ brute-force oracle


def _oracle(q, k, v, heads, w, gk, gv, table, gbias, neighbor, exact):
    """Per query position: list its keys from the map positions of the neighbour windows, then softmax."""
    b, h, wd, c = q.shape
    hd = c // heads
    mx, my = -(-h // w), -(-wd // w)
    hp, wp = mx * w, my * w
    chunks = R.neighborhood.neighbor_chunks(neighbor)
    out = torch.zeros_like(q)
    g = 0 if gk is None else gk.shape[1]
    for r in range(h):
        for col in range(wd):
            m, n, li, lj = r // w, col // w, r % w, col % w
            keys, biases = [], []
            for ch in chunks:
                dm, dn = ch // 3 - 1, ch % 3 - 1
                for ki in range(w):
                    for kj in range(w):
                        kr, kc = (m + dm) * w + ki, (n + dn) * w + kj  # unwrapped
                        if exact == -1:
                            ok = not (h <= kr < hp or wd <= kc < wp)
                        else:
                            ok = 0 <= kr < h and 0 <= kc < wd
                            if exact == 1:
                                ok = ok and abs(kr - r) <= w and abs(kc - col) <= w
                        if not ok:
                            continue
                        ar, ac = kr % hp, kc % wp  # the cyclic mode wraps; else kr, kc are in the map
                        keys.append((ar, ac))
                        biases.append((li - ki - dm * w + 2 * w - 1) * (4 * w - 1) + (lj - kj - dn * w + 2 * w - 1))
            for hh in range(heads):
                sl = slice(hh * hd, (hh + 1) * hd)
                qv = q[:, r, col, sl] * hd**-0.5
                kmat = torch.stack([k[:, ar, ac, sl] if ar < h and ac < wd else torch.zeros_like(qv)
                                    for ar, ac in keys], 1)
                vmat = torch.stack([v[:, ar, ac, sl] if ar < h and ac < wd else torch.zeros_like(qv)
                                    for ar, ac in keys], 1)
                logits = torch.einsum("bd,bkd->bk", qv, kmat)
                if table is not None:
                    logits = logits + table[torch.tensor(biases), hh]
                if g:
                    lg = torch.einsum("bd,bgd->bg", qv, gk[:, :, sl])
                    if gbias is not None:
                        lg = lg + gbias[hh]
                    logits = torch.cat([lg, logits], 1)
                    vmat = torch.cat([gv[:, :, sl], vmat], 1)
                out[:, r, col, sl] = torch.einsum("bk,bkd->bd", logits.softmax(-1), vmat)
    return out


def _inputs(b, h, w, heads, hd, win, g, dtype=torch.float32, bias=True, device="cpu"):
    c = heads * hd
    q, k, v = (torch.randn(b, h, w, c, device=device).to(dtype) for _ in range(3))
    gk = torch.randn(b, g, c, device=device).to(dtype) if g else None
    gv = torch.randn(b, g, c, device=device).to(dtype) if g else None
    table = torch.randn((4 * win - 1) ** 2, heads, device=device) if bias else None
    gbias = torch.randn(heads, g, device=device) if (bias and g) else None
    return q, k, v, gk, gv, table, gbias


ORACLE_CASES = [  # (B, H, W, heads, hd, window, G, neighbor, exact)
    (2, 7, 8, 2, 4, 3, 1, 0, 0),
    (1, 5, 5, 1, 4, 2, 2, 0, -1),
    (1, 7, 5, 2, 4, 3, 0, 0, 1),
    (1, 2, 7, 1, 4, 3, 1, 3, 0),  # map shorter than one window
    (1, 8, 7, 1, 4, 3, 2, 5, -1),
    (1, 6, 6, 1, 4, 3, 1, 8, 0),
    (1, 4, 5, 1, 4, 2, 0, -1, 0),
    (1, 3, 4, 1, 4, 2, 1, 1, -1),  # cyclic wrap on a 2x2 window grid
]


@pytest.mark.parametrize("case", ORACLE_CASES, ids=[str(c) for c in ORACLE_CASES])
def test_reference_matches_bruteforce(case):
    b, h, w, heads, hd, win, g, nb, ex = case
    args = [t.double() if t is not None else None for t in _inputs(b, h, w, heads, hd, win, g)]
    q, k, v, gk, gv, table, gbias = args
    got = R.neighborhood_window_attention(q, k, v, heads, win, gk, gv, table, gbias, nb, None, ex)
    want = _oracle(q, k, v, heads, win, gk, gv, table, gbias, nb, ex)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_torch_backend_is_the_reference_and_global_path():
    q, k, v, gk, gv, table, gbias = _inputs(2, 5, 6, 2, 8, 2, 2)
    got = ek.neighborhood_window_attention(q, k, v, 2, 2, global_k=gk, global_v=gv, local_bias_table=table,
                                           global_bias=gbias, neighbor=4, backend="torch")
    want = R.neighborhood_window_attention(q, k, v, 2, 2, gk, gv, table, gbias, 4)
    assert torch.equal(got, want)
    # global queries: dense attention over [global, local] tokens with a (heads, G, N) bias
    toks_k = torch.cat([gk, k.reshape(2, 30, 16)], 1)
    toks_v = torch.cat([gv, v.reshape(2, 30, 16)], 1)
    qg = torch.randn(2, 2, 16)
    bias = torch.randn(2, 2, 32)
    out = ek.global_token_attention(qg, toks_k, toks_v, 2, bias)
    qh = qg.view(2, 2, 2, 8).transpose(1, 2) * 8**-0.5
    attn = (qh @ toks_k.view(2, 32, 2, 8).permute(0, 2, 3, 1) + bias).softmax(-1)
    want = (attn @ toks_v.view(2, 32, 2, 8).transpose(1, 2)).transpose(1, 2).reshape(2, 2, 16)
    torch.testing.assert_close(out, want)


def test_torch_backend_reads_strided_views():
    """Slices of one Linear's output, on a map that needs no padding, give the contiguous result."""
    x, gx = torch.randn(2, 6, 6, 96), torch.randn(2, 1, 64)
    views = (x[..., :32], x[..., 32:64], x[..., 64:], gx[..., :32], gx[..., 32:])
    got = ek.neighborhood_window_attention(*views[:3], 2, 3, *views[3:], backend="torch")
    want = ek.neighborhood_window_attention(*(t.contiguous() for t in views[:3]), 2, 3,
                                            *(t.contiguous() for t in views[3:]), backend="torch")
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------ input checks


def _call(**over):
    q = torch.randn(1, 5, 5, 8)
    kw = dict(q=q, k=q, v=q, num_heads=2, window_size=2, backend="torch")
    kw.update(over)
    return ek.neighborhood_window_attention(**kw)


@pytest.mark.parametrize("over, exc, match", [
    (dict(k=torch.randn(1, 5, 4, 8)), ValueError, "one shape"),
    (dict(q=torch.randn(5, 5, 8)), ValueError, "4 dimensions"),
    (dict(k=torch.randn(1, 5, 5, 8).double(), v=torch.randn(1, 5, 5, 8).double()), TypeError, "float32"),
    (dict(num_heads=3), ValueError, "multiple of num_heads"),
    (dict(num_heads=0), ValueError, "positive int"),
    (dict(window_size=0), ValueError, "positive int"),
    (dict(neighbor=9), ValueError, "neighbor must be one of"),
    (dict(exact=2), ValueError, "exact must be one of"),
    (dict(exact=1, neighbor=3), ValueError, "only for neighbor=0"),
    (dict(global_k=torch.randn(1, 1, 8)), ValueError, "together"),
    (dict(global_k=torch.randn(1, 1, 6), global_v=torch.randn(1, 1, 6)), ValueError, r"\(B=1, G, C=8\)"),
    (dict(local_bias_table=torch.randn(50, 2)), ValueError, r"\(4w-1\)\^2"),
    (dict(global_bias=torch.randn(2, 1)), ValueError, "no global tokens"),
    (dict(q=torch.randn(1, 0, 5, 8), k=torch.randn(1, 0, 5, 8), v=torch.randn(1, 0, 5, 8)), ValueError, "H=0"),
    (dict(backend="cuda"), BackendUnavailableError, "cuda"),
    (dict(backend="nope"), ValueError, "unknown backend"),
])
def test_bad_inputs_fail_clearly(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


@requires_triton
def test_fused_backend_limits_and_strides_fail_clearly():
    q = torch.randn(1, 4, 4, 2 * 160)
    with pytest.raises(ValueError, match="head_dim <= 128"):
        ek.neighborhood_window_attention(q, q, q, 2, 2, backend="triton")
    q = torch.randn(1, 4, 4, 16)
    with pytest.raises(ValueError, match="window_size <= 16"):
        ek.neighborhood_window_attention(q, q, q, 1, 17, backend="triton")
    with pytest.raises(ValueError, match="unit stride"):
        ek.neighborhood_window_attention(q, q, torch.randn(1, 4, 4, 32)[..., ::2], 1, 2, backend="triton")


def test_global_token_attention_bad_inputs():
    qg, k = torch.randn(1, 1, 8), torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match=r"\(heads, G, N\)"):
        ek.global_token_attention(qg, k, k, 2, torch.randn(2, 1, 3))
    with pytest.raises(ValueError, match="N >= 1"):
        ek.global_token_attention(qg, k[:, :0], k[:, :0], 2)


# ------------------------------------------------------------------------------ fused Triton vs reference

CASES = {  # (B, H, W, heads, head_dim, window, G, neighbor, exact)
    "vil_w7_pad": (1, 9, 10, 2, 32, 7, 1, 0, 0),  # ViL's window, 2x2 windows with padding
    "smaller_than_w": (2, 5, 6, 1, 16, 7, 1, 0, 0),  # one padded window
    "odd_smaller_than_3w_g2": (1, 7, 8, 2, 16, 3, 2, 0, 0),
    "g0_neighbor3": (1, 7, 9, 1, 32, 3, 0, 3, 0),
    "g2_neighbor5": (1, 8, 5, 2, 16, 2, 2, 5, 0),
    "g1_neighbor8": (1, 6, 7, 1, 16, 3, 1, 8, 0),
    "own_window_only": (1, 5, 7, 1, 16, 3, 1, -1, 0),
    "hd24_padded": (1, 7, 7, 2, 24, 3, 1, 0, 0),
    "cyclic": (1, 8, 7, 1, 16, 3, 2, 0, -1),
    "cyclic_neighbor5_2x2_grid": (1, 3, 4, 1, 16, 2, 1, 5, -1),
    "exact_sliding": (1, 7, 5, 2, 16, 3, 1, 0, 1),
    "g17_two_global_tiles": (1, 4, 5, 1, 16, 2, 17, 0, 0),  # G > 16: a 32-row global-key tile
    "w5_neighbor7": (1, 11, 7, 1, 16, 5, 1, 7, 0),  # 25 tokens in a 32-row tile
    "one_row_map_w1": (1, 1, 9, 1, 16, 1, 1, 0, -1),  # 1x1 windows, cyclic
}
HALF_CASES = ["vil_w7_pad", "g2_neighbor5", "cyclic"]


def _run(case, dtype, bias=True, backend="triton", device="cpu", cases=CASES):
    """Fused output and gradients, and the fp32 reference's on the same (rounded) inputs."""
    b, h, w, heads, hd, win, g, nb, ex = cases[case]
    ins = list(_inputs(b, h, w, heads, hd, win, g, dtype, bias, device))
    leaves = [t.requires_grad_() if t is not None else None for t in ins]
    out = ek.neighborhood_window_attention(*leaves[:3], heads, win, *leaves[3:], neighbor=nb, exact=ex,
                                           backend=backend)
    ref_leaves = [t.detach().float().requires_grad_() if t is not None else None for t in ins]
    ref = R.neighborhood_window_attention(*ref_leaves[:3], heads, win, *ref_leaves[3:], nb, None, ex)
    grad = torch.randn_like(ref)
    names = [n for n, t in zip(("dq", "dk", "dv", "dglobal_k", "dglobal_v", "dtable", "dglobal_bias"), leaves)
             if t is not None]
    got = torch.autograd.grad(out, [t for t in leaves if t is not None], grad.to(dtype))
    want = torch.autograd.grad(ref, [t for t in ref_leaves if t is not None], grad)
    return out, ref, got, want, names


def check(out, ref, got, want, names, dtype):
    """Output within conftest.TOL of the reference, gradients within TOL (fp32) or 2 x TOL (fp16 / bf16, as the
    Swin tests: the table and global-bias gradients sum dS over many pairs whose contributions cancel, and
    delta = rowsum(dO * O) reads the rounded output: up to 2.5e-2 in bf16, 2.8e-3 in fp16 over CASES);
    gradients in the inputs' dtypes."""
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "out")
    for n, a, e in zip(names, got, want):
        assert a.dtype == (torch.float32 if n in ("dtable", "dglobal_bias") else dtype), n
        assert_close(a, e, dtype, n, factor=1.0 if dtype == torch.float32 else 2.0)


@requires_triton
@pytest.mark.parametrize("case", list(CASES))
def test_fused_fp32(case):
    check(*_run(case, torch.float32), torch.float32)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", HALF_CASES)
def test_fused_half(case, dtype):
    """Half precision against the fp32 reference on the same rounded inputs, tolerances of :func:`check` (P
    and dS are rounded to the input dtype before the matmuls, as FlashAttention does)."""
    check(*_run(case, dtype), dtype)


@requires_triton
def test_fused_without_biases():
    res = _run("odd_smaller_than_3w_g2", torch.float32, bias=False)
    assert res[-1] == ["dq", "dk", "dv", "dglobal_k", "dglobal_v"]
    check(*res, torch.float32)


@requires_triton
def test_fused_gradients_are_deterministic():
    """The table, global-bias and global-key gradients are fixed-order sums: bitwise equal run to run (the
    same seed draws the same problem)."""
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(_run("g2_neighbor5", torch.float32)[2])
    assert len(runs[0]) == 7
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@requires_triton
def test_fused_reads_strided_views():
    """q, k, v and the global keys / values as slices of one Linear's output (no copy) give the same result
    as contiguous tensors."""
    heads, hd, win = 2, 16, 3
    c = heads * hd
    x = torch.randn(1, 7, 8, 3 * c)
    gx = torch.randn(1, 1, 2 * c)
    q, k, v = x[..., :c], x[..., c:2 * c], x[..., 2 * c:]
    gk, gv = gx[..., :c], gx[..., c:]
    got = ek.neighborhood_window_attention(q, k, v, heads, win, gk, gv, backend="triton")
    want = ek.neighborhood_window_attention(q.contiguous(), k.contiguous(), v.contiguous(), heads, win,
                                            gk.contiguous(), gv.contiguous(), backend="triton")
    assert torch.equal(got, want)
    ref = R.neighborhood_window_attention(q, k, v, heads, win, gk, gv)
    assert_close(got, ref, torch.float32, "out")


@requires_triton
def test_fused_empty_batch():
    q = torch.randn(0, 5, 5, 16, requires_grad=True)
    gk = torch.randn(0, 1, 16, requires_grad=True)
    table = torch.randn(49, 1, requires_grad=True)
    out = ek.neighborhood_window_attention(q, q, q, 1, 2, gk, gk, table, backend="triton")
    assert out.shape == (0, 5, 5, 16)
    dq, dg, dt = torch.autograd.grad(out.sum(), [q, gk, table])
    assert dq.shape == q.shape and dg.shape == gk.shape and torch.equal(dt, torch.zeros_like(table))


@requires_triton
def test_torch_compile_fullgraph():
    """The custom op traces (fake implementations) and differentiates under torch.compile."""
    q, k, v, gk, gv, table, gbias = (t.requires_grad_() for t in _inputs(1, 5, 6, 1, 16, 2, 1))
    leaves = (q, k, v, gk, gv, table, gbias)

    def f(*x):
        return ek.neighborhood_window_attention(*x[:3], 1, 2, *x[3:], neighbor=2, backend="triton").square().sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    got = torch.autograd.grad(loss, leaves)
    want = torch.autograd.grad(f(*leaves), leaves)
    torch.testing.assert_close(loss, f(*leaves))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
