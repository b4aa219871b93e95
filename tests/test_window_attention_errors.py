"""Bad input to the window-attention ops gets a clear error (never a wrong answer), and backend
selection says what it picked or why it cannot run."""

from __future__ import annotations

import pytest
import torch

import esvit_kernels as ek
from esvit_kernels.backends import BackendUnavailableError, resolve_backend


def _qkv(b=1, h=7, w=7, c=32):
    return torch.randn(b, h, w, 3 * c)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"window_size": 0}, ValueError, "window_size must be >= 1"),
        ({"shift_size": 7}, ValueError, "0 <= shift < window"),
        ({"shift_size": -1}, ValueError, "0 <= shift < window"),
        ({"window_size": (7, 7, 7)}, TypeError, "pair of ints"),
        ({"num_heads": 5}, ValueError, "3 \\* num_heads \\* head_dim"),
        ({"bias_table": torch.randn(100, 2)}, ValueError, "bias_table must have shape"),
        ({"pad_qkv": torch.randn(5)}, ValueError, "pad_qkv must have shape"),
        ({"backend": "nope"}, ValueError, "unknown backend"),
    ],
)
def test_shifted_bad_arguments(kwargs, exc, match):
    args = {"num_heads": 2, "window_size": 7, "shift_size": 3}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ek.shifted_window_attention(_qkv(), **args)


def test_shifted_bad_tensors():
    with pytest.raises(ValueError, match="4 dimensions"):
        ek.shifted_window_attention(torch.randn(7, 7, 96), num_heads=2, window_size=7)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ek.shifted_window_attention(_qkv().long(), num_heads=2, window_size=7)
    with pytest.raises(ValueError, match="is on meta"):
        ek.shifted_window_attention(_qkv(), num_heads=2, window_size=7,
                                    bias_table=torch.randn(169, 2, device="meta"))


def test_windows_bad_tensors():
    q = torch.randn(4, 2, 49, 16)
    with pytest.raises(ValueError, match="N=49 tokens per window but window"):
        ek.window_attention(q, q, q, window_size=6)
    with pytest.raises(ValueError, match="one shape"):
        ek.window_attention(q, q, q[:2], window_size=7)
    with pytest.raises(TypeError, match="dtype"):
        ek.window_attention(q, q.half(), q, window_size=7)
    with pytest.raises(ValueError, match="mask must have shape"):
        ek.window_attention(q, q, q, window_size=7, mask=torch.zeros(3, 49, 49))
    with pytest.raises(ValueError, match="bias_table must have shape"):
        ek.window_attention(q, q, q, window_size=7, bias_table=torch.zeros(169, 3))


@pytest.mark.skipif(not ek.available_backends()["triton"].available, reason="triton not runnable here")
def test_fused_backend_needs_unit_last_stride():
    q = torch.randn(4, 2, 16, 49).transpose(-1, -2)  # head_dim not contiguous
    with pytest.raises(ValueError, match="unit stride"):
        ek.window_attention(q, q, q, window_size=7, backend="triton")


def test_unavailable_backends_fail_clearly(monkeypatch):
    q = torch.randn(1, 1, 49, 16)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ek.window_attention(q, q, q, window_size=7, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="triton"):
            ek.window_attention(q, q, q, window_size=7, backend="triton")


def test_auto_says_what_it_picked(caplog):
    name, reason = resolve_backend("auto", "cpu", "window_attention")
    assert name == "torch" and "auto on cpu" in reason
    status = ek.available_backends()
    assert set(status) == {"triton", "cuda", "torch"}
    assert status["torch"].available and all(s.reason for s in status.values())


def test_environment_report_runs(capsys):
    from esvit_kernels.__main__ import environment, main

    env = environment()
    assert env["torch"] == torch.__version__ and set(env["backends"]) == {"triton", "cuda", "torch"}
    assert main([]) == 0
    assert "backends" in capsys.readouterr().out


def check_empty_inputs(backends=("torch", "triton"), device="cpu"):
    """B = 0 (no windows): an empty output, an empty qkv gradient and zero bias-table / pad gradients (sums
    over no window); 0 heads, head_dim 0, H = 0 or W = 0: a ValueError. The same on every backend."""
    for backend in backends:
        table = torch.randn(9, 2, device=device, requires_grad=True)
        q = torch.randn(0, 2, 4, 8, device=device, requires_grad=True)
        out = ek.window_attention(q, q, q, window_size=2, bias_table=table[:9], backend=backend)
        assert out.shape == (0, 2, 4, 8)
        dq, dt = torch.autograd.grad(out.sum(), (q, table))
        assert dq.shape == q.shape and torch.equal(dt, torch.zeros_like(dt))
        qkv = torch.randn(0, 5, 5, 24, device=device, requires_grad=True)
        pad = torch.randn(24, device=device, requires_grad=True)
        out = ek.shifted_window_attention(qkv, num_heads=2, window_size=2, shift_size=1, bias_table=table,
                                          pad_qkv=pad, backend=backend)
        assert out.shape == (0, 5, 5, 8)
        dqkv, dt, dp = torch.autograd.grad(out.sum(), (qkv, table, pad))
        assert dqkv.shape == qkv.shape and not dt.any() and not dp.any()
        for shape, what in (((2, 0, 4, 8), "heads=0"), ((2, 2, 4, 0), "head_dim=0")):
            x = torch.randn(*shape, device=device)
            with pytest.raises(ValueError, match=f"window_attention needs .*got {what}"):
                ek.window_attention(x, x, x, window_size=2, backend=backend)
        for shape, what in (((1, 4, 4, 0), "head_dim=0"), ((1, 0, 4, 24), "H=0"), ((1, 4, 0, 24), "W=0")):
            with pytest.raises(ValueError, match=f"shifted_window_attention needs .*got {what}"):
                ek.shifted_window_attention(torch.randn(*shape, device=device), num_heads=2, window_size=2,
                                            backend=backend)


def test_empty_inputs():
    backends = ("torch", "triton") if ek.available_backends()["triton"].available else ("torch",)
    check_empty_inputs(backends)
