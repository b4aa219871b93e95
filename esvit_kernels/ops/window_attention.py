"""Custom ops for window attention: schemas, fake (meta) implementations and autograd, for the Triton
backend (namespace ``esvit_triton``, defined here) and the CUDA backend (namespace ``esvit_cuda``,
defined in C++ by ``csrc/`` with the same schemas; its fake impls and autograd are registered here).

Both backends implement the same contract, so one autograd wiring serves both:

``swa_fwd(Tensor qkv, Tensor? bias_table, Tensor? pad_qkv, int num_heads, int window_h, int window_w,
int shift_h, int shift_w, float scale, bool roll_before_pad) -> (Tensor out, Tensor lse)``
    qkv (B, H, W, 3C) contiguous; pad_qkv (3C,) in qkv's dtype or None (zeros); out (B, H, W, C)
    contiguous in qkv's dtype; lse (B*nW, heads, N) float32 with nW = ceil(H/Wh)*ceil(W/Ww) and
    windows numbered (b, window row, window col) over the padded, shifted map.

``swa_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse, Tensor? bias_table, Tensor? pad_qkv,
int num_heads, int window_h, int window_w, int shift_h, int shift_w, float scale, bool roll_before_pad,
bool need_dbias, bool need_dpad) -> (Tensor dqkv, Tensor dbias, Tensor dpad)``
    dout contiguous (B, H, W, C); dqkv like qkv; dbias ((2Wh-1)(2Ww-1), heads) float32 (empty when not
    needed); dpad (3C,) float32 (empty when not needed).

``wa_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias_table, Tensor? mask, int window_h, int window_w,
float scale) -> (Tensor out, Tensor lse)``
    q, k, v (B*nW, heads, N, hd) with unit last stride (other strides arbitrary); mask (nW, N, N) float
    with unit last stride or None; out (B*nW, heads, N, hd) laid out as ``empty(B*nW, N, heads,
    hd).transpose(1, 2)``; lse (B*nW, heads, N) float32.

``wa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? bias_table,
Tensor? mask, int window_h, int window_w, float scale, bool need_dbias) -> (Tensor dq, Tensor dk,
Tensor dv, Tensor dbias)``
    dout (B*nW, heads, N, hd) with unit last stride; dq, dk, dv laid out like ``out``; dbias as above.

Every op, both layouts:
    * lse[w, h, i] = log sum_j exp(logit[i, j]) (natural log) of query i; +inf for a query whose logits
      are all -inf (every key masked): its output is 0 and, since exp(logit - lse) is then 0 for every
      key, its gradients are 0 (PyTorch's SDPA math path and FlexAttention define such a row the same
      way; FlashAttention stores the same +inf). NaN for a query whose logits hold a NaN.
    * Windows are independent: a NaN/inf in one window's q, k, v, dout or mask (or a pad vector, in the
      windows holding padding) makes non-finite exactly the outputs and gradients the dense per-window
      computation (the eager reference) makes non-finite, never another window's, also where the Triton
      kernels pack several small windows into one tile. dbias and dpad sum over all windows, as in the
      reference; dpad's q third is always 0 (padded outputs are discarded).
    * B*nW = 0: empty outputs, zero dbias / dpad.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

from ..backends import BackendUnavailableError

__all__ = ["get"]

_EMPTY_F32 = {"dtype": torch.float32}


def _n_windows(h: int, w: int, wh: int, ww: int) -> int:
    return (-(-h // wh)) * (-(-w // ww))


# ------------------------------------------------------------------------------ fake implementations


def _swa_fwd_fake(qkv, bias_table, pad_qkv, num_heads, window_h, window_w, shift_h, shift_w, scale,
                  roll_before_pad):
    b, h, w, c3 = qkv.shape
    nw = _n_windows(h, w, window_h, window_w)
    out = qkv.new_empty(b, h, w, c3 // 3)
    lse = qkv.new_empty(b * nw, num_heads, window_h * window_w, **_EMPTY_F32)
    return out, lse


def _swa_bwd_fake(dout, qkv, out, lse, bias_table, pad_qkv, num_heads, window_h, window_w, shift_h,
                  shift_w, scale, roll_before_pad, need_dbias, need_dpad):
    dbias = (qkv.new_empty(bias_table.shape, **_EMPTY_F32) if need_dbias and bias_table is not None
             else qkv.new_empty(0, **_EMPTY_F32))
    dpad = qkv.new_empty(qkv.shape[-1], **_EMPTY_F32) if need_dpad else qkv.new_empty(0, **_EMPTY_F32)
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), dbias, dpad


def _windows_layout(like: torch.Tensor) -> torch.Tensor:
    bw, heads, n, hd = like.shape
    return like.new_empty(bw, n, heads, hd).transpose(1, 2)


def _wa_fwd_fake(q, k, v, bias_table, mask, window_h, window_w, scale):
    bw, heads, n, _ = q.shape
    return _windows_layout(q), q.new_empty(bw, heads, n, **_EMPTY_F32)


def _wa_bwd_fake(dout, q, k, v, out, lse, bias_table, mask, window_h, window_w, scale, need_dbias):
    dbias = (q.new_empty(bias_table.shape, **_EMPTY_F32) if need_dbias and bias_table is not None
             else q.new_empty(0, **_EMPTY_F32))
    return _windows_layout(q), _windows_layout(q), _windows_layout(q), dbias


# ------------------------------------------------------------------------------ Triton custom ops


def _triton_kernels():
    return importlib.import_module("esvit_kernels._triton.window_attention")


@torch.library.custom_op("esvit_triton::swa_fwd", mutates_args=())
def _triton_swa_fwd(
    qkv: torch.Tensor, bias_table: torch.Tensor | None, pad_qkv: torch.Tensor | None, num_heads: int,
    window_h: int, window_w: int, shift_h: int, shift_w: int, scale: float, roll_before_pad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_kernels().swa_forward(qkv, bias_table, pad_qkv, num_heads, (window_h, window_w),
                                         (shift_h, shift_w), scale, roll_before_pad)


@torch.library.custom_op("esvit_triton::swa_bwd", mutates_args=())
def _triton_swa_bwd(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    bias_table: torch.Tensor | None, pad_qkv: torch.Tensor | None, num_heads: int, window_h: int,
    window_w: int, shift_h: int, shift_w: int, scale: float, roll_before_pad: bool, need_dbias: bool,
    need_dpad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_kernels().swa_backward(
        dout, qkv, out, lse, bias_table, pad_qkv, num_heads, (window_h, window_w), (shift_h, shift_w),
        scale, roll_before_pad, need_dbias, need_dpad,
    )


@torch.library.custom_op("esvit_triton::wa_fwd", mutates_args=())
def _triton_wa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor | None,
    mask: torch.Tensor | None, window_h: int, window_w: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_kernels().wa_forward(q, k, v, bias_table, mask, (window_h, window_w), scale)


@torch.library.custom_op("esvit_triton::wa_bwd", mutates_args=())
def _triton_wa_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, bias_table: torch.Tensor | None, mask: torch.Tensor | None, window_h: int,
    window_w: int, scale: float, need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_kernels().wa_backward(dout, q, k, v, out, lse, bias_table, mask, (window_h, window_w),
                                         scale, need_dbias)


# ------------------------------------------------------------------------------ autograd wiring


def _register(ns: str) -> None:
    """Fake impls (for ops defined in C++) and autograd for the four ops of namespace ``ns``."""
    ops = getattr(torch.ops, ns)
    if ns != "esvit_triton":  # the Python-defined ops get their fakes below, C++ ones here
        for name, fake in (("swa_fwd", _swa_fwd_fake), ("swa_bwd", _swa_bwd_fake),
                           ("wa_fwd", _wa_fwd_fake), ("wa_bwd", _wa_bwd_fake)):
            torch.library.register_fake(f"{ns}::{name}", fake)

    def swa_setup(ctx, inputs, output):
        qkv, bias_table, pad_qkv, *static = inputs
        out, lse = output
        ctx.static = static
        ctx.need = (bias_table is not None and ctx.needs_input_grad[1],
                    pad_qkv is not None and ctx.needs_input_grad[2])
        ctx.save_for_backward(qkv, out, lse, bias_table, pad_qkv)

    def swa_backward(ctx, dout, _dlse):
        qkv, out, lse, bias_table, pad_qkv = ctx.saved_tensors
        dqkv, dbias, dpad = ops.swa_bwd(dout.contiguous(), qkv, out, lse, bias_table, pad_qkv,
                                        *ctx.static, *ctx.need)
        dbias = dbias.to(bias_table.dtype) if ctx.need[0] else None
        dpad = dpad.to(pad_qkv.dtype) if ctx.need[1] else None
        return (dqkv, dbias, dpad) + (None,) * len(ctx.static)

    def wa_setup(ctx, inputs, output):
        q, k, v, bias_table, mask, *static = inputs
        out, lse = output
        ctx.static = static
        ctx.need_dbias = bias_table is not None and ctx.needs_input_grad[3]
        ctx.save_for_backward(q, k, v, out, lse, bias_table, mask)

    def wa_backward(ctx, dout, _dlse):
        q, k, v, out, lse, bias_table, mask = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv, dbias = ops.wa_bwd(dout, q, k, v, out, lse, bias_table, mask, *ctx.static,
                                       ctx.need_dbias)
        dbias = dbias.to(bias_table.dtype) if ctx.need_dbias else None
        return (dq, dk, dv, dbias, None) + (None,) * len(ctx.static)

    torch.library.register_autograd(f"{ns}::swa_fwd", swa_backward, setup_context=swa_setup)
    torch.library.register_autograd(f"{ns}::wa_fwd", wa_backward, setup_context=wa_setup)


_triton_swa_fwd.register_fake(_swa_fwd_fake)
_triton_swa_bwd.register_fake(_swa_bwd_fake)
_triton_wa_fwd.register_fake(_wa_fwd_fake)
_triton_wa_bwd.register_fake(_wa_bwd_fake)
_register("esvit_triton")

_cuda_registered = False


def _cuda_ops():
    global _cuda_registered
    if not _cuda_registered:
        try:
            importlib.import_module("esvit_kernels._C")
        except Exception as exc:  # resolve_backend normally catches this first
            raise BackendUnavailableError(f"the cuda backend is unavailable: {exc}") from exc
        _register("esvit_cuda")
        _cuda_registered = True
    return torch.ops.esvit_cuda


# ------------------------------------------------------------------------------ entry points


def get(op: str, backend: str):
    """The fused implementation of ``op`` ("window_attention" | "shifted_window_attention")."""
    if backend == "triton":
        ops = torch.ops.esvit_triton
    elif backend == "cuda":
        ops = _cuda_ops()
    else:
        raise BackendUnavailableError(f"{op}: no fused implementation for backend {backend!r}")

    if op == "window_attention":

        def window_attention(q, k, v, ws, bias_table, mask, scale):
            return ops.wa_fwd(q, k, v, bias_table, mask, ws[0], ws[1], scale)[0]

        return window_attention
    if op == "shifted_window_attention":

        def shifted_window_attention(qkv, num_heads, ws, ss, bias_table, scale, pad_qkv, roll_before_pad):
            if pad_qkv is not None and pad_qkv.dtype != qkv.dtype:
                pad_qkv = pad_qkv.to(qkv.dtype)
            return ops.swa_fwd(qkv.contiguous(), bias_table, pad_qkv, num_heads, ws[0], ws[1], ss[0], ss[1],
                               scale, roll_before_pad)[0]

        return shifted_window_attention
    raise ValueError(f"unknown op {op!r}")


# csrc/ops.cpp points torch at this module for the esvit_cuda window ops' fakes (set_python_module):
# register them on import whenever the extension is built, not only on the first get(..., "cuda").
with contextlib.suppress(BackendUnavailableError):
    _cuda_ops()
