"""Make a timm ``SwinTransformer`` run its window attention on the fused kernels, in place.

timm's block rolls the (unpadded) map, pads it, partitions, runs ``WindowAttention`` (qkv Linear,
attention with bias + mask, proj), reverses, crops and rolls back. The patched block computes the qkv
Linear on the map and calls :func:`~esvit_kernels.shifted_window_attention` with ``roll_before_pad=True``
(timm's order) and ``pad_qkv = qkv.bias`` (timm pads the LayerNorm output with zeros, so padding tokens
carry the qkv bias), then ``proj``. Outputs and gradients match the unpatched model.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .functional import shifted_window_attention

__all__ = ["patch_timm_swin", "unpatch_timm_swin"]


def _fused_attn(self, x: torch.Tensor) -> torch.Tensor:
    attn = self.attn
    qkv = attn.qkv(x)
    out = shifted_window_attention(
        qkv,
        num_heads=attn.num_heads,
        window_size=tuple(self.window_size),
        shift_size=tuple(self.shift_size),
        bias_table=attn.relative_position_bias_table,
        scale=attn.scale,
        pad_qkv=attn.qkv.bias,
        roll_before_pad=True,
        backend=self._esvit_backend,
    )
    return attn.proj_drop(attn.proj(out))


def patch_timm_swin(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Patch every timm ``SwinTransformerBlock`` in ``model`` to use the fused window attention.

    Returns the same model. Attention dropout must be 0 (the kernels implement none); a block with
    ``attn_drop > 0`` raises ``ValueError``. Undo with :func:`unpatch_timm_swin`.
    """
    from timm.models.swin_transformer import SwinTransformerBlock

    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    if not blocks:
        raise ValueError("patch_timm_swin: the model has no timm SwinTransformerBlock")
    for blk in blocks:
        if blk.attn.attn_drop.p > 0:
            raise ValueError("patch_timm_swin: attention dropout > 0 is not supported by the fused kernels")
        blk._esvit_backend = backend
        blk._attn = types.MethodType(_fused_attn, blk)
    return model


def unpatch_timm_swin(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_timm_swin`."""
    for blk in model.modules():
        if hasattr(blk, "_esvit_backend"):
            del blk._attn
            del blk._esvit_backend
    return model
