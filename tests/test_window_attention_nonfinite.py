"""Non-finite input and fully masked queries in window attention: one behaviour on every backend.

* A NaN/inf in the q, k, v (or dout, pad_qkv, mask) of one window makes non-finite exactly the outputs and
  gradients the eager reference makes non-finite (that window and head; the bias-table and pad gradients,
  sums over all windows, as in the reference): other windows and other images stay finite and correct,
  also when the Triton kernels pack several small windows into one tile (W <= 5).
* A query whose every logit is -inf (a user mask hiding all keys) gets output 0 and zero gradients (PyTorch's
  SDPA math path and FlexAttention do the same); its lse is +inf.

The helpers take a device and a backend: tests/gpu runs them compiled, on the triton and cuda backends.
"""

from __future__ import annotations

import pytest
import torch

import esvit_kernels as ek
from esvit_kernels import reference as R

from .conftest import TOL, rel_err, requires_triton

NAN, INF = float("nan"), float("inf")


def assert_same_nonfinite(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """got is non-finite exactly where want is, and close to it elsewhere."""
    bad_got, bad_want = ~torch.isfinite(got), ~torch.isfinite(want)
    extra, missing = (bad_got & ~bad_want).nonzero(), (bad_want & ~bad_got).nonzero()
    assert not len(extra) and not len(missing), (
        f"{name}: non-finite where the reference is finite at {extra[:4].tolist()} ({len(extra)}), "
        f"finite where it is not at {missing[:4].tolist()} ({len(missing)})")
    ok = ~bad_want
    if ok.any():
        factor = 1.0 if dtype == torch.float32 else 2.0
        assert rel_err(got[ok], want[ok].to(got.dtype)) <= TOL[dtype] * factor, name


# (H, W) map per window size: several windows per image, the small ones packed several to a Triton tile
MAP_HW = {2: (4, 6), 3: (6, 6), 4: (8, 8), 7: (7, 14)}


def run_map_nonfinite(ws: int, dtype, backend: str, device: str = "cpu", pad: bool = False, heads: int = 2,
                      hd: int = 16):
    """Map layout, 5 images: NaN in a q of image 0, +inf in a k of image 2, -inf in a v of image 3 and NaN
    in dout of image 4 (image 1 clean), or with ``pad`` a map that needs padding and a NaN in pad_qkv's
    k part. Every output and gradient must be non-finite exactly where the reference's is."""
    h, w = (5, 5) if pad else MAP_HW[ws]
    c = heads * hd
    qkv = torch.randn(5, h, w, 3 * c)
    padv = torch.randn(3 * c)
    dout = torch.randn(5, h, w, c)
    if pad:
        padv[c + 3] = NAN
    else:
        qkv[0, 1, 1, 5] = NAN  # q, head 0
        qkv[2, 0, 2, c + hd + 1] = INF  # k, head 1
        qkv[3, h - 1, w - 1, 2 * c + 2] = -INF  # v, head 0
        dout[4, 1, 0, hd + 4] = NAN  # upstream gradient, head 1
    table = torch.randn((2 * ws - 1) ** 2, heads)
    args = {"num_heads": heads, "window_size": ws, "shift_size": ws // 2}
    results = {}
    for name, dt, be, dev in (("got", dtype, backend, device), ("want", torch.float32, "torch", "cpu")):
        x = qkv.to(dtype).to(dt).to(dev).requires_grad_()
        t = table.to(dev).requires_grad_()
        p = padv.to(dtype).to(dt).to(dev).requires_grad_()
        out = ek.shifted_window_attention(x, bias_table=t, pad_qkv=p, backend=be, **args)
        grads = torch.autograd.grad(out, (x, t, p), dout.to(dtype).to(dt).to(dev), allow_unused=True,
                                    materialize_grads=True)
        results[name] = [r.detach().cpu() for r in (out, *grads)]
    got, want = results["got"], results["want"]
    for g, wt, name in zip(got[:3], want[:3], ("out", "dqkv", "dbias")):
        assert_same_nonfinite(g, wt, dtype, name)
    # dpad: the k/v parts are sums over all windows' padding tokens, as in the reference; the q part is 0
    # (padded outputs are discarded), where the reference's 0 * NaN may give NaN
    assert_same_nonfinite(got[3][c:], want[3][c:], dtype, "dpad k/v")
    assert torch.equal(got[3][:c], torch.zeros(c))
    if not pad:  # the issue's check: image 1 was clean, so it stays finite
        assert torch.isfinite(got[0][1]).all() and torch.isfinite(got[1][1]).all()
    return got, want


def _windows_vs_reference(qkv, table, mask, dout, ws, dtype, backend, device) -> dict:
    """(out, dqkv, dbias) of timm's strided q/k/v views on ``backend`` ("got") and the fp32 reference
    ("want") on the same (rounded) inputs."""
    results = {}
    for name, dt, be, dev in (("got", dtype, backend, device), ("want", torch.float32, "torch", "cpu")):
        x = qkv.to(dtype).to(dt).to(dev).requires_grad_()
        t = table.to(dev).requires_grad_()
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
        out = ek.window_attention(q, k, v, window_size=ws, bias_table=t, mask=mask.to(dev), backend=be)
        grads = torch.autograd.grad(out, (x, t), dout.to(dtype).to(dt).to(dev))
        results[name] = [r.detach().cpu() for r in (out, *grads)]
    return results


def run_windows_nonfinite(ws: int, dtype, backend: str, device: str = "cpu", heads: int = 2, hd: int = 16):
    """Windows layout (timm's strided q/k/v views), 3 images x 4 windows with a mask: NaN in a q, +inf in a
    k, NaN in a v, NaN in dout and NaN in one mask window (image-independent: it hits windows 1, 5, 9)."""
    n, nw = ws * ws, 4
    bw = 3 * nw
    qkv = torch.randn(bw, n, 3, heads, hd)
    qkv[0, 1, 0, 0, 3] = NAN
    qkv[6, n - 1, 1, 1, 0] = INF
    qkv[11, 0, 2, 0, 7] = NAN
    dout = torch.randn(bw, heads, n, hd)
    dout[3, 1, 0, 2] = NAN
    mask = torch.where(torch.rand(nw, n, n) < 0.3, -100.0, 0.0)
    mask[1, 0, n - 1] = NAN
    table = torch.randn((2 * ws - 1) ** 2, heads)
    results = _windows_vs_reference(qkv, table, mask, dout, ws, dtype, backend, device)
    for g, wt, name in zip(results["got"], results["want"], ("out", "dqkv", "dbias")):
        assert_same_nonfinite(g, wt, dtype, name)
    assert torch.isfinite(results["got"][0][[2, 4, 7, 8, 10]]).all()  # windows no input reaches


def run_empty_rows(ws: int, dtype, backend: str, device: str = "cpu", heads: int = 2, hd: int = 16):
    """A user mask that hides every key from some queries: their output is 0, every gradient finite and
    equal to the reference's (those queries pass none), lse +inf; the other queries as usual."""
    n, nw = ws * ws, 2
    bw = 2 * nw
    qkv = torch.randn(bw, n, 3, heads, hd)
    mask = torch.zeros(nw, n, n)
    mask[0, 1, :] = -INF  # query 1 of the windows 0, 2 sees nothing
    mask[1, n - 1, :] = -INF
    mask[1, 0, ::2] = -INF  # half hidden: an ordinary row
    table = torch.randn((2 * ws - 1) ** 2, heads)
    dout = torch.randn(bw, heads, n, hd)
    results = _windows_vs_reference(qkv, table, mask, dout, ws, dtype, backend, device)
    (out, dqkv, dbias), want = results["got"], results["want"]
    assert torch.equal(out[0::2, :, 1], torch.zeros_like(out[0::2, :, 1]))
    assert torch.equal(out[1::2, :, n - 1], torch.zeros_like(out[1::2, :, n - 1]))
    assert torch.equal(dqkv[0::2, 1, 0], torch.zeros_like(dqkv[0::2, 1, 0]))  # dq of a query that sees nothing
    for g, wt, name in zip((out, dqkv, dbias), want, ("out", "dqkv", "dbias")):
        assert torch.isfinite(g).all(), name
        assert_same_nonfinite(g, wt, dtype, name)
    if backend != "torch":
        ops = torch.ops.esvit_triton if backend == "triton" else torch.ops.esvit_cuda
        q, k, v = qkv.to(dtype).to(device).permute(2, 0, 3, 1, 4).unbind(0)
        _, lse = ops.wa_fwd(q, k, v, table.to(device), mask.to(device), ws, ws, hd**-0.5)
        assert (lse[0::2, :, 1] == INF).all() and (lse[1::2, :, n - 1] == INF).all()
        assert torch.isfinite(lse[0::2, :, 0]).all() and torch.isfinite(lse[1::2, :, 0]).all()


# ----------------------------------------------------------------------------------------- the reference


def test_reference_empty_rows_and_bitwise_unchanged_elsewhere():
    run_empty_rows(3, torch.float32, "torch")
    # the -100 shift mask (and any row with a finite logit) is untouched: bitwise the plain softmax
    q, k, v = (torch.randn(8, 2, 49, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = R.shift_mask((14, 14), (7, 7), (3, 3), dtype=torch.float64)
    mask[0, 0, 1:] = -INF  # one finite logit left
    out = R.window_attention(q, k, v, (7, 7), None, mask, 0.25)
    logits = ((q * 0.25) @ k.transpose(-2, -1)).view(2, 4, 2, 49, 49) + mask[None, :, None]
    plain = logits.view(8, 2, 49, 49).softmax(-1) @ v
    assert torch.equal(out, plain)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(plain, (q, k, v), dout)):
        assert torch.equal(a, b)


def test_reference_keeps_nan_in_its_window():
    """The oracle itself: the issue's repro, NaN in one image stays in that image."""
    qkv = torch.randn(4, 4, 4, 96)
    qkv[2, 1, 1, 67] = NAN
    out = ek.shifted_window_attention(qkv, num_heads=2, window_size=4, backend="torch")
    assert [i for i in range(4) if not torch.isfinite(out[i]).all()] == [2]


# ----------------------------------------------------------------------------------------- triton


@requires_triton
def test_issue_repro_triton():
    """Issue 13: with 2x2 windows packed 16 to a tile, a NaN in image 2 made all four images NaN."""
    qkv = torch.randn(4, 4, 4, 96)
    qkv[2, 1, 1, 67] = NAN
    out = ek.shifted_window_attention(qkv, num_heads=2, window_size=4, backend="triton")
    ref = ek.shifted_window_attention(qkv, num_heads=2, window_size=4, backend="torch")
    assert [i for i in range(4) if not torch.isfinite(out[i]).all()] == [2]
    assert_same_nonfinite(out, ref, torch.float32, "out")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-split-bwd", "bf16-fused-bwd"])
@pytest.mark.parametrize("ws", [2, 3, 4, 7])
def test_map_nonfinite_stays_in_its_window(ws, dtype):
    run_map_nonfinite(ws, dtype, "triton")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_map_nonfinite_pad_vector(dtype):
    run_map_nonfinite(3, dtype, "triton", pad=True)


@requires_triton
def test_map_nonfinite_split_backward_half():
    """bf16 with head_dim 64 takes the split backward (dQ kernel, then dK/dV kernel) with packed windows."""
    run_map_nonfinite(3, torch.bfloat16, "triton", hd=64)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ws", [2, 4, 7])
def test_windows_nonfinite_stays_in_its_window(ws, dtype):
    run_windows_nonfinite(ws, dtype, "triton")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ws", [3, 8])  # 3: packed windows; 8: N = 64 fills the tile, no padding column
def test_empty_rows_triton(ws, dtype):
    run_empty_rows(ws, dtype, "triton")


@requires_triton
@pytest.mark.parametrize("case", ["w3-fp32-hd64", "w12-fp32", "w12-bf16-hd128"])
def test_chunked_paths_keep_nonfinite_in_its_window_and_empty_rows_zero(case):
    """The paths that walk keys / queries in 4 chunks (an online softmax whose first chunks may hold only
    -inf logits for a row, rotating dbias accumulators): packed 3x3 windows in fp32 at head_dim 64 (chunks of
    16 keys cut across windows; the SAFE pass poisons chunk by chunk), and 12x12 windows (TILE 256)."""
    ws, dtype, hd = {"w3-fp32-hd64": (3, torch.float32, 64), "w12-fp32": (12, torch.float32, 16),
                     "w12-bf16-hd128": (12, torch.bfloat16, 128)}[case]
    if ws == 3:  # one window per tile (W12) keeps a NaN in its window without the SAFE pass, as W7 tests
        run_map_nonfinite(ws, dtype, "triton", hd=hd)
    run_empty_rows(ws, dtype, "triton", heads=1, hd=hd)
