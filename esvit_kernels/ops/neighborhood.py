"""Custom ops for ViL's neighbourhood window attention (Triton backend, namespace ``esvit_triton``): schemas,
fake (meta) implementations for ``torch.compile``, and autograd.

``nwa_fwd(Tensor q, Tensor k, Tensor v, Tensor? global_k, Tensor? global_v, Tensor? local_bias_table,
Tensor? global_bias, int num_heads, int window, int neighbor, float scale, int exact) -> (Tensor out,
Tensor lse)``
    q, k, v (B, H, W, C) with unit last stride; global_k / global_v (B, G, C) with G >= 1 or None; out
    (B, H, W, C) contiguous in q's dtype; lse (B*mx*my, heads, BL) float32, BL = max(16, next_pow2(w*w)).

``nwa_bwd(Tensor dout, ..., Tensor out, Tensor lse, ..., bool need_dtable, bool need_dgbias) -> (dq, dk, dv,
dglobal_k, dglobal_v, dtable, dglobal_bias)``
    dq, dk, dv contiguous (B, H, W, C); dglobal_k / dglobal_v (B, G, C) (empty without global tokens);
    dtable ((4w-1)^2, heads) and dglobal_bias (heads, G) float32 (empty when not needed). Deterministic.

The ``cuda`` backend has no kernel for this op (:data:`esvit_kernels.backends.OP_BACKENDS`).
"""

from __future__ import annotations

import importlib

import torch

from ..backends import BackendUnavailableError

__all__ = ["get"]

_F32 = {"dtype": torch.float32}


def _kernels():
    return importlib.import_module("esvit_kernels._triton.neighborhood")


@torch.library.custom_op("esvit_triton::nwa_fwd", mutates_args=())
def _nwa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, global_k: torch.Tensor | None,
    global_v: torch.Tensor | None, local_bias_table: torch.Tensor | None, global_bias: torch.Tensor | None,
    num_heads: int, window: int, neighbor: int, scale: float, exact: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().nwa_forward(q, k, v, global_k, global_v, local_bias_table, global_bias, num_heads, window,
                                  neighbor, scale, exact)


@torch.library.custom_op("esvit_triton::nwa_bwd", mutates_args=())
def _nwa_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, global_k: torch.Tensor | None,
    global_v: torch.Tensor | None, local_bias_table: torch.Tensor | None, global_bias: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, num_heads: int, window: int, neighbor: int, scale: float, exact: int,
    need_dtable: bool, need_dgbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().nwa_backward(dout, q, k, v, global_k, global_v, local_bias_table, global_bias, out, lse,
                                   num_heads, window, neighbor, scale, exact, need_dtable, need_dgbias)


def _tile_rows(window: int) -> int:
    return max(16, 1 << max(0, (window * window - 1).bit_length()))


@_nwa_fwd.register_fake
def _(q, k, v, global_k, global_v, local_bias_table, global_bias, num_heads, window, neighbor, scale, exact):
    b, h, w, _ = q.shape
    nwt = b * (-(-h // window)) * (-(-w // window))
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        nwt, num_heads, _tile_rows(window), **_F32)


@_nwa_bwd.register_fake
def _(dout, q, k, v, global_k, global_v, local_bias_table, global_bias, out, lse, num_heads, window, neighbor,
      scale, exact, need_dtable, need_dgbias):
    grads = [torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3)]
    dg = [torch.empty_like(x, memory_format=torch.contiguous_format) if x is not None else q.new_empty(0, **_F32)
          for x in (global_k, global_v)]
    dtab = (q.new_empty(local_bias_table.shape, **_F32) if need_dtable and local_bias_table is not None
            else q.new_empty(0, **_F32))
    dgb = (q.new_empty(global_bias.shape, **_F32) if need_dgbias and global_bias is not None
           else q.new_empty(0, **_F32))
    return (*grads, *dg, dtab, dgb)


def _setup(ctx, inputs, output):
    q, k, v, gk, gv, table, gbias, *static = inputs
    ctx.static = static
    ctx.need = (table is not None and ctx.needs_input_grad[5], gbias is not None and ctx.needs_input_grad[6])
    ctx.has_g = gk is not None
    ctx.save_for_backward(q, k, v, gk, gv, table, gbias, *output)


def _backward(ctx, dout, _dlse):
    q, k, v, gk, gv, table, gbias, out, lse = ctx.saved_tensors
    dq, dk, dv, dgk, dgv, dtab, dgb = torch.ops.esvit_triton.nwa_bwd(
        dout, q, k, v, gk, gv, table, gbias, out, lse, *ctx.static, *ctx.need)
    return (dq, dk, dv, dgk if ctx.has_g else None, dgv if ctx.has_g else None,
            dtab.to(table.dtype) if ctx.need[0] else None, dgb.to(gbias.dtype) if ctx.need[1] else None,
            *(None,) * len(ctx.static))


torch.library.register_autograd("esvit_triton::nwa_fwd", _backward, setup_context=_setup)


def get(op: str, backend: str):
    """The fused implementation of ``op`` ("neighborhood_window_attention") for ``backend``."""
    if op != "neighborhood_window_attention":
        raise ValueError(f"unknown op {op!r}")
    if backend != "triton":
        raise BackendUnavailableError(f"{op}: no fused implementation for backend {backend!r}")

    def neighborhood_window_attention(q, k, v, heads, window, gk, gv, table, gbias, neighbor, scale, exact):
        return torch.ops.esvit_triton.nwa_fwd(q, k, v, gk, gv, table, gbias, heads, window, neighbor, scale,
                                              exact)[0]

    return neighborhood_window_attention
