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
