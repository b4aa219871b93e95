"""Drop-in modules on the fused ops.

``WindowAttention`` keeps the parameter names of timm and the official Swin (``qkv``, ``proj``,
``relative_position_bias_table``) so their state dicts load unchanged (a persistent
``relative_position_index`` buffer from the official checkpoints is accepted and ignored: the kernels
compute the index arithmetically).
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import pair
from .functional import shifted_window_attention, window_attention

__all__ = ["WindowAttention"]


class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative-position bias (W-MSA / SW-MSA).

    ``forward(x, mask)`` takes windows (B*nW, N, C) like timm's and the official module;
    ``forward_map(x, shift_size)`` takes the (B, H, W, C) map and does the (shifted) window partition,
    padding and mask inside the kernel, which is what a Swin block wants.
    """

    def __init__(
        self,
        dim: int,
        window_size: int | tuple[int, int],
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        head_dim: int | None = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.window_size = pair(window_size, "window_size")
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        if head_dim * num_heads != dim and head_dim is None:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.head_dim = head_dim
        self.scale = qk_scale or head_dim**-0.5
        self.backend = backend
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * wh - 1) * (2 * ww - 1), num_heads, **dd))
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(num_heads * head_dim, dim, **dd)
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._drop_derived_buffers)

    def reset_parameters(self) -> None:
        """Swin's init: trunc-normal(0.02) for the bias table and Linear weights, zero biases."""
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        for lin in (self.qkv, self.proj):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    @staticmethod
    def _drop_derived_buffers(state_dict, prefix, *args, **kwargs) -> None:
        # official Swin checkpoints store the (derived) index as a persistent buffer
        state_dict.pop(prefix + "relative_position_index", None)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B*nW, N, C) windows; mask: optional additive (nW, N, N). Returns (B*nW, N, C)."""
        bw, n, _ = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = window_attention(
            q, k, v, window_size=self.window_size, bias_table=self.relative_position_bias_table,
            mask=mask, scale=self.scale, backend=self.backend,
        )
        return self.proj(out.transpose(1, 2).reshape(bw, n, -1))

    def forward_map(
        self, x: torch.Tensor, shift_size: int | tuple[int, int] = 0, roll_before_pad: bool = False
    ) -> torch.Tensor:
        """x: (B, H, W, C) map (any H, W: padding tokens get the qkv bias, unmasked). Returns (B, H, W, C)."""
        qkv = self.qkv(x)
        out = shifted_window_attention(
            qkv, num_heads=self.num_heads, window_size=self.window_size, shift_size=shift_size,
            bias_table=self.relative_position_bias_table, scale=self.scale, pad_qkv=self.qkv.bias,
            roll_before_pad=roll_before_pad, backend=self.backend,
        )
        return self.proj(out)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"backend={self.backend!r}")
