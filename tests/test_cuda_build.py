"""The CUDA backend on a CPU machine: the extension builds, imports and exposes every op with its schema and
fake impl; the cuda backend explains why it cannot run here; and the index arithmetic the kernels use
(csrc/window_index.h) matches the eager reference, checked by compiling the header with the host C++
compiler (csrc/tests/index_check.cpp) -- the CPU-side evidence that the kernels address the map right.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import esvit_kernels as ek
from esvit_kernels import reference as R
from esvit_kernels.backends import OP_BACKENDS, BackendUnavailableError, available_backends

ROOT = Path(__file__).resolve().parents[1]

SCHEMAS = {
    "swa_fwd": "esvit_cuda::swa_fwd(Tensor qkv, Tensor? bias_table, Tensor? pad_qkv, int num_heads, int window_h, "
    "int window_w, int shift_h, int shift_w, float scale, bool roll_before_pad) -> (Tensor out, Tensor lse)",
    "swa_bwd": "esvit_cuda::swa_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse, Tensor? bias_table, "
    "Tensor? pad_qkv, int num_heads, int window_h, int window_w, int shift_h, int shift_w, float scale, "
    "bool roll_before_pad, bool need_dbias, bool need_dpad) -> (Tensor dqkv, Tensor dbias, Tensor dpad)",
    "wa_fwd": "esvit_cuda::wa_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias_table, Tensor? mask, int window_h, "
    "int window_w, float scale) -> (Tensor out, Tensor lse)",
    "wa_bwd": "esvit_cuda::wa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? bias_table, Tensor? mask, int window_h, int window_w, float scale, bool need_dbias) -> "
    "(Tensor dq, Tensor dk, Tensor dv, Tensor dbias)",
    "region_match": "esvit_cuda::region_match(Tensor student, Tensor teacher) -> Tensor",
    "region_loss_fwd": "esvit_cuda::region_loss_fwd(Tensor student, Tensor teacher, Tensor match, Tensor center, "
    "float student_temp, float teacher_temp) -> (Tensor loss, Tensor stats)",
    "region_loss_bwd": "esvit_cuda::region_loss_bwd(Tensor grad_loss, Tensor student, Tensor teacher, "
    "Tensor match, Tensor center, Tensor stats, float student_temp, float teacher_temp) -> Tensor",
}


def _expect_extension() -> bool:
    """A toolkit was there at build time (CUDA_HOME set, as `make test` / CI do), torch is a CUDA build and the
    build was not disabled: then the extension must be there."""
    return (bool(os.environ.get("CUDA_HOME")) and torch.version.cuda is not None
            and os.environ.get("ESVIT_KERNELS_BUILD_CUDA", "auto") != "0")


def _load_ext():
    try:
        return importlib.import_module("esvit_kernels._C")
    except ImportError as exc:
        if _expect_extension():
            pytest.fail(f"CUDA_HOME is set but esvit_kernels._C does not import ({exc}); `make build` builds it")
        pytest.skip(f"esvit_kernels._C is not built (no CUDA toolkit at build time): {exc}")


@pytest.fixture(scope="module")
def ext():
    return _load_ext()


# ----------------------------------------------------------------------------------- the extension


def test_extension_imports_and_has_every_schema(ext):
    for name, schema in SCHEMAS.items():
        assert hasattr(torch.ops.esvit_cuda, name), f"torch.ops.esvit_cuda.{name} is missing"
        assert str(getattr(torch.ops.esvit_cuda, name).default._schema) == schema


def test_fake_impls_are_found_where_the_pystubs_say(ext):
    for name in SCHEMAS:
        module = torch._C._dispatch_pystub(f"esvit_cuda::{name}", "")[0]
        assert module in ("esvit_kernels.ops.window_attention", "esvit_kernels.ops.cuda_losses")
        importlib.import_module(module)  # the named module exists


def test_fake_impls_give_the_contract_shapes(ext):
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = importlib.import_module("esvit_kernels.ops.window_attention")._cuda_ops()
    importlib.import_module("esvit_kernels.ops.cuda_losses").get("region_match")
    with FakeTensorMode():
        qkv = torch.empty(2, 5, 7, 3 * 12, device="cuda", dtype=torch.bfloat16)
        table = torch.empty(5 * 7, 3, device="cuda")
        out, lse = ops.swa_fwd(qkv, table, None, 3, 3, 4, 1, 2, 0.5, False)
        assert out.shape == (2, 5, 7, 12) and out.dtype == torch.bfloat16
        assert lse.shape == (2 * 2 * 2, 3, 12) and lse.dtype == torch.float32
        dqkv, dbias, dpad = ops.swa_bwd(out, qkv, out, lse, table, None, 3, 3, 4, 1, 2, 0.5, False, True, True)
        assert dqkv.shape == qkv.shape and dbias.shape == table.shape and dpad.shape == (36,)
        q = torch.empty(6, 3, 12, 4, device="cuda")
        o, lse = ops.wa_fwd(q, q, q, table, None, 3, 4, 0.5)
        assert o.shape == q.shape and o.transpose(1, 2).is_contiguous() and lse.shape == (6, 3, 12)
        s, t = torch.empty(4, 9, 16, device="cuda"), torch.empty(4, 49, 16, device="cuda")
        idx = torch.ops.esvit_cuda.region_match(s, t)
        assert idx.shape == (4, 9) and idx.dtype == torch.int64
        ls, lt = torch.empty(4, 9, 64, device="cuda", dtype=torch.float16), torch.empty(4, 49, 64, device="cuda")
        loss, stats = torch.ops.esvit_cuda.region_loss_fwd(ls, lt.half(), idx, lt[0, 0], 0.1, 0.04)
        assert loss.shape == () and loss.dtype == torch.float32 and stats.shape == (36, 2)
        assert torch.ops.esvit_cuda.region_loss_bwd(loss, ls, lt.half(), idx, lt[0, 0], stats, 0.1, 0.04).shape \
            == ls.shape


def test_autograd_traces_to_the_backward_op(ext):
    """Forward + backward of the fused op traced with fake tensors (meta: the autograd engine would initialise
    CUDA for cuda ones): the graph calls swa_fwd / swa_bwd
    with the bias and pad gradients requested (what torch.compile sees, minus running it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    ops = importlib.import_module("esvit_kernels.ops.window_attention").get("shifted_window_attention", "cuda")

    def step(qkv, table, pad):
        out = ops(qkv, 2, (3, 3), (1, 1), table, 0.25, pad, False)
        return torch.autograd.grad(out.sum(), (qkv, table, pad))

    with FakeTensorMode():
        qkv = torch.empty(1, 5, 5, 24, device="meta", requires_grad=True)
        table = torch.empty(25, 2, device="meta", requires_grad=True)
        pad = torch.empty(24, device="meta", requires_grad=True)
        gm = make_fx(step)(qkv, table, pad)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "esvit_cuda.swa_fwd.default" in targets and "esvit_cuda.swa_bwd.default" in targets
    bwd = next(n for n in gm.graph.nodes if str(n.target) == "esvit_cuda.swa_bwd.default")
    assert bwd.args[-2:] == (True, True)  # need_dbias, need_dpad


def test_region_loss_autograd_traces_to_the_backward_op(ext):
    loss_fn = importlib.import_module("esvit_kernels.ops.cuda_losses").get("region_loss")

    def step(s, t, m, c):
        return torch.autograd.grad(loss_fn(s, t, m, c, 0.1, 0.04), s)

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode():
        s = torch.empty(2, 9, 128, device="meta", requires_grad=True)
        t = torch.empty(2, 49, 128, device="meta")
        gm = make_fx(step)(s, t, torch.empty(2, 9, dtype=torch.long, device="meta"), torch.empty(128, device="meta"))
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "esvit_cuda.region_loss_fwd.default" in targets and "esvit_cuda.region_loss_bwd.default" in targets


# ----------------------------------------------------------------------------------- the backend


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_backend_says_why_it_cannot_run_here():
    status = available_backends()["cuda"]
    assert not status.available
    assert "no CUDA device" in status.reason or "not built" in status.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_backend_cuda_on_cpu_tensors_raises():
    q = torch.randn(2, 2, 4, 8)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ek.window_attention(q, q, q, window_size=2, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ek.shifted_window_attention(torch.randn(1, 4, 4, 24), num_heads=2, window_size=2, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ek.region_match(torch.randn(1, 3, 4), torch.randn(1, 5, 4), backend="cuda")


def test_op_backends_lists_cuda_only_where_there_is_a_kernel(ext):
    wa = importlib.import_module("esvit_kernels.ops.window_attention")
    cl = importlib.import_module("esvit_kernels.ops.cuda_losses")
    for op, backends in OP_BACKENDS.items():
        if op in ("window_attention", "shifted_window_attention"):
            assert "cuda" in backends and callable(wa.get(op, "cuda"))
        elif "cuda" in backends:
            assert callable(cl.get(op)), op
        else:
            with pytest.raises(BackendUnavailableError, match="no kernel"):
                cl.get(op)


# ----------------------------------------------------------------------------------- window_index.h on the CPU


@pytest.fixture(scope="module")
def index_check(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no host C++ compiler to build csrc/tests/index_check.cpp")
    exe = tmp_path_factory.mktemp("index_check") / "index_check"
    subprocess.run([cxx, "-O1", "-std=c++17", "-Wall", "-Werror", "-o", str(exe),
                    str(ROOT / "csrc/tests/index_check.cpp")], check=True)
    return exe


def _padded_map(x: torch.Tensor, h, w, ws, ss, rbp, fill):
    """The reference's pad / roll order on a (1, H, W, 1) map (pad value `fill`), as the padded shifted map."""
    hp, wp = -(-h // ws[0]) * ws[0], -(-w // ws[1]) * ws[1]

    def pad(t):
        return F.pad(t, (0, 0, 0, wp - w, 0, hp - h), value=fill)

    if rbp:
        return pad(torch.roll(x, (-ss[0], -ss[1]), (1, 2)))
    return torch.roll(pad(x), (-ss[0], -ss[1]), (1, 2))


MAP_CASES = [  # (H, W), window, shift
    ((5, 7), (3, 4), (1, 2)), ((14, 14), (7, 7), (3, 3)), ((10, 13), (4, 4), (2, 2)), ((7, 7), (7, 7), (0, 0)),
    ((6, 11), (5, 5), (2, 2)), ((3, 3), (3, 3), (1, 1)), ((9, 5), (4, 2), (3, 0)), ((8, 9), (2, 3), (0, 1)),
    ((1, 6), (1, 4), (0, 3)), ((12, 12), (12, 12), (0, 0)), ((16, 15), (14, 14), (7, 7)), ((4, 4), (2, 2), (1, 1)),
]


@pytest.mark.parametrize("rbp", [False, True])
@pytest.mark.parametrize("hw,ws,ss", MAP_CASES)
def test_index_tables_match_reference(index_check, hw, ws, ss, rbp):
    h, w = hw
    tile = 8
    res = subprocess.run([str(index_check), "tables", str(h), str(w), *map(str, ws), *map(str, ss), str(int(rbp)),
                          str(tile)], check=True, capture_output=True, text=True).stdout.split("\n")
    rows = [line.split() for line in res if line]
    n = ws[0] * ws[1]
    # token -> source pixel (or -1) and shift label, against the reference pipeline on a coordinate map
    pix = torch.arange(h * w, dtype=torch.float64).view(1, h, w, 1)
    want_pix = R.window_partition(_padded_map(pix, h, w, ws, ss, rbp, -1.0), ws)[..., 0].long()
    hp, wp = -(-h // ws[0]) * ws[0], -(-w // ws[1]) * ws[1]
    labels = R.shift_region_labels((hp, wp), ws, ss)
    want_lab = R.window_partition(labels[None, :, :, None], ws)[..., 0]
    tok = torch.tensor([[int(v) for v in r[1:]] for r in rows if r[0] == "tok"])
    assert tok.shape == (want_pix.numel(), 4)
    assert torch.equal(tok[:, 2].view_as(want_pix), want_pix)
    assert torch.equal(tok[:, 3].view_as(want_lab), want_lab)
    # relative index
    rel = torch.tensor([[int(v) for v in r[1:]] for r in rows if r[0] == "rel"])
    assert torch.equal(rel[:, 2].view(n, n), R.relative_position_index(ws))
    # bias-gradient enumeration: every (i, j) of every tile exactly once under its own row, keys increasing
    pairs = [tuple(int(v) for v in r[1:]) for r in rows if r[0] == "pair"]
    relidx = R.relative_position_index(ws)
    want = {(i // tile, j // tile, int(relidx[i, j]), i, j) for i in range(n) for j in range(n)}
    assert len(pairs) == len(want) and set(pairs) == want
    for a, b in zip(pairs, pairs[1:]):
        if a[:3] == b[:3]:
            assert b[4] > a[4]


def _run_emulator(exe, mode, tmp_path, header, arrays, *args):
    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    np.concatenate([np.asarray(header, dtype=np.float64)] +
                   [a.detach().double().reshape(-1).numpy() for a in arrays]).tofile(inp)
    subprocess.run([str(exe), mode, str(inp), str(out), *map(str, args)], check=True)
    return torch.from_numpy(np.fromfile(out, dtype=np.float64))


def _split(flat, shapes):
    out, at = [], 0
    for s in shapes:
        k = int(np.prod(s))
        out.append(flat[at:at + k].view(*s))
        at += k
    assert at == flat.numel()
    return out


def _reference_lse_map(qkv, heads, ws, ss, table, scale, pad, rbp):
    """lse (B*nW, heads, N) of the reference's windows, for the contract's window numbering."""
    b, h, w, c3 = qkv.shape
    c, n = c3 // 3, ws[0] * ws[1]
    hp, wp = -(-h // ws[0]) * ws[0], -(-w // ws[1]) * ws[1]
    x = torch.cat([qkv, torch.ones(b, h, w, 1, dtype=qkv.dtype)], -1)
    x = _padded_map(x, h, w, ws, ss, rbp, 0.0)
    real = x[..., -1:]
    x = x[..., :-1] + (1 - real) * pad
    win = R.window_partition(x, ws).view(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    logits = (win[0] * scale) @ win[1].transpose(-2, -1) + R.gather_relative_bias(table, ws)
    if ss != (0, 0):
        mask = R.shift_mask((hp, wp), ws, ss, dtype=qkv.dtype)
        logits = (logits.view(b, -1, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    return logits.logsumexp(-1)


@pytest.mark.parametrize("rbp", [False, True])
@pytest.mark.parametrize("hw,ws,ss", MAP_CASES[:9])
def test_map_emulation_matches_reference(index_check, tmp_path, hw, ws, ss, rbp):
    """Forward, lse and every gradient of a float64 emulation of the kernels' math that addresses the map
    only through window_index.h (incl. the tile-owner bias-gradient sums and the pad gradient)."""
    b, heads, hd = 2, 2, 3
    h, w = hw
    c = heads * hd
    n, t = ws[0] * ws[1], (2 * ws[0] - 1) * (2 * ws[1] - 1)
    qkv = torch.randn(b, h, w, 3 * c, dtype=torch.float64, requires_grad=True)
    table = torch.randn(t, heads, dtype=torch.float64, requires_grad=True)
    pad = torch.randn(3 * c, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(b, h, w, c, dtype=torch.float64)
    scale = 0.7
    ref = R.shifted_window_attention(qkv, heads, ws, ss, table, scale, pad, rbp)
    gq, gb, gp = torch.autograd.grad(ref, (qkv, table, pad), dout, allow_unused=True, materialize_grads=True)
    nw = -(-h // ws[0]) * -(-w // ws[1])
    header = [b, h, w, 3 * c, heads, *ws, *ss, int(rbp), 1, 1, scale]
    flat = _run_emulator(index_check, "map", tmp_path, header, [qkv, table, pad, dout], 4)  # 4x4 tiles
    out, lse, dqkv, dbias, dpad = _split(flat, [(b, h, w, c), (b * nw, heads, n), qkv.shape, table.shape, (3 * c,)])
    tol = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(out, ref.detach(), **tol)
    torch.testing.assert_close(lse, _reference_lse_map(qkv.detach(), heads, ws, ss, table.detach(), scale,
                                                       pad.detach(), rbp), **tol)
    torch.testing.assert_close(dqkv, gq, **tol)
    torch.testing.assert_close(dbias, gb, **tol)
    torch.testing.assert_close(dpad, gp, **tol)
    assert dpad[:c].abs().max() == 0  # padding queries get no gradient: their outputs are discarded


@pytest.mark.parametrize("ws,nwm,empty_rows", [((3, 4), 2, False), ((2, 2), 0, False), ((7, 7), 4, False),
                                                ((5, 3), 1, False), ((3, 4), 2, True)])
def test_windows_emulation_matches_reference(index_check, tmp_path, ws, nwm, empty_rows):
    """With ``empty_rows`` the mask hides every key from some queries: output 0, lse +inf, zero gradients."""
    bw, heads, hd = 8, 3, 4
    n, t = ws[0] * ws[1], (2 * ws[0] - 1) * (2 * ws[1] - 1)
    q, k, v = (torch.randn(bw, heads, n, hd, dtype=torch.float64, requires_grad=True) for _ in range(3))
    table = torch.randn(t, heads, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(nwm, n, n, dtype=torch.float64) * 3 if nwm else None
    if empty_rows:
        mask[0, 1] = -float("inf")
        mask[1, n - 1] = -float("inf")
        mask[1, 0, ::2] = -float("inf")  # half hidden: an ordinary row
    dout = torch.randn(bw, heads, n, hd, dtype=torch.float64)
    scale = 0.6
    ref = R.window_attention(q, k, v, ws, table, mask, scale)
    grads = torch.autograd.grad(ref, (q, k, v, table), dout)
    header = [bw, heads, n, hd, *ws, nwm, 1, scale]
    arrays = [q, k, v, table] + ([mask] if nwm else []) + [dout]
    flat = _run_emulator(index_check, "win", tmp_path, header, arrays, 8)  # tile size
    out, lse, dq, dk, dv, dbias = _split(flat, [q.shape, (bw, heads, n), q.shape, q.shape, q.shape, table.shape])
    logits = (q * scale) @ k.transpose(-2, -1) + R.gather_relative_bias(table, ws)
    if nwm:
        logits = (logits.view(-1, nwm, heads, n, n) + mask[None, :, None]).view(bw, heads, n, n)
    tol = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(out, ref.detach(), **tol)
    want_lse = logits.detach().logsumexp(-1)
    torch.testing.assert_close(lse, want_lse.masked_fill(want_lse == -float("inf"), float("inf")), **tol)
    for got, want in zip((dq, dk, dv, dbias), grads):
        torch.testing.assert_close(got, want, **tol)
    if empty_rows:
        assert (lse[0::2, :, 1] == float("inf")).all() and (out[0::2, :, 1] == 0).all()
        assert (dq[0::2, :, 1] == 0).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("k,ts,tt,spread", [(3, 0.1, 0.04, 1.0), (1000, 0.1, 0.04, 1.0), (4101, 0.1, 0.07, 5.0),
                                            (65536, 0.1, 0.04, 0.01), (65536, 0.1, 0.04, 8.0), (2049, 1.0, 1.0, 0.0)])
def test_region_loss_replay_matches_reference(index_check, tmp_path, k, ts, tt, spread):
    """The CUDA region loss's streaming log-sum-exp (csrc/online_lse.h) replayed on the CPU in float32 with
    the kernel's split over threads / warps, against the reference loss and gradient of one row: peaked,
    near-uniform (p ~ 1/65536, DINO's early regime) and exactly uniform distributions."""
    s = (torch.randn(1, 1, k, dtype=torch.float64) * spread).float().double().requires_grad_()
    t = (torch.randn(1, 1, k, dtype=torch.float64) * spread).float().double()
    c = (torch.randn(k, dtype=torch.float64) * spread * 0.1).float().double()
    loss = R.region_loss(s, t, torch.zeros(1, 1, dtype=torch.long), c, ts, tt)
    (grad,) = torch.autograd.grad(loss, s)
    flat = _run_emulator(index_check, "lse", tmp_path, [k, ts, tt], [s, t, c])
    lse_x, lse_u, ce, got = flat[0], flat[1], flat[2], flat[3:]
    log2e = 1 / np.log(2)
    torch.testing.assert_close(lse_x, torch.logsumexp(s.detach()[0, 0] / ts, -1) * log2e, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse_u, torch.logsumexp((t[0, 0] - c) / tt, -1) * log2e, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ce, loss.detach().double(), rtol=2e-5, atol=2e-5)
    scale = max(grad.abs().max().item(), 1.0 / (k * ts))  # the uniform case has a zero gradient
    torch.testing.assert_close(got, grad[0, 0], rtol=1e-4, atol=1e-4 * scale)
