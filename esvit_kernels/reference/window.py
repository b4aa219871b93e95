"""Eager PyTorch reference for Swin window attention: the oracle every fused kernel is tested against.

It follows the official Swin / EsViT code step by step (materialising everything the fused kernels
avoid): relative-position index, shift mask (0 / -100 over 9 region labels of the padded map), window
partition/reverse, ``q * scale @ k^T + bias (+ mask) -> softmax -> @ v``. Padded tokens are *not* masked:
their qkv is a given vector (the qkv Linear's bias, since the map is zero-padded after LayerNorm) and
they take part in attention like any other token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "relative_position_index",
    "shift_region_labels",
    "shift_mask",
    "window_partition",
    "window_reverse",
    "gather_relative_bias",
    "window_attention",
    "shifted_window_attention",
]


def relative_position_index(window_size: tuple[int, int], device=None) -> torch.Tensor:
    """(N, N) index into the ((2Wh-1)(2Ww-1), heads) bias table, N = Wh*Ww.

    For a (query i, key j) pair: (row_i - row_j + Wh - 1) * (2Ww - 1) + (col_i - col_j + Ww - 1).
    """
    wh, ww = window_size
    rows = torch.arange(wh, device=device).repeat_interleave(ww)
    cols = torch.arange(ww, device=device).repeat(wh)
    dr = rows[:, None] - rows[None, :] + wh - 1
    dc = cols[:, None] - cols[None, :] + ww - 1
    return dr * (2 * ww - 1) + dc


def _bands(length: int, window: int, shift: int, device) -> torch.Tensor:
    """Band label along one axis of the padded, shifted map: [0,-W) -> 0, [-W,-s) -> 1, [-s,end) -> 2.

    With shift 0 every position gets the same label (as in the official slicing, where ``-0`` selects
    the whole axis).
    """
    pos = torch.arange(length, device=device)
    if shift == 0:
        return torch.zeros(length, dtype=torch.long, device=device)
    return (pos >= length - window).long() + (pos >= length - shift).long()


def shift_region_labels(
    padded_hw: tuple[int, int], window_size: tuple[int, int], shift_size: tuple[int, int], device=None
) -> torch.Tensor:
    """(Hp, Wp) region label (0..8) of every position of the padded, shifted map."""
    rb = _bands(padded_hw[0], window_size[0], shift_size[0], device)
    cb = _bands(padded_hw[1], window_size[1], shift_size[1], device)
    return rb[:, None] * 3 + cb[None, :]


def window_partition(x: torch.Tensor, window_size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, Wh * Ww, C), windows of one image contiguous, row-major over the grid."""
    b, h, w, c = x.shape
    wh, ww = window_size
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows: torch.Tensor, window_size: tuple[int, int], h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, Wh * Ww, C) -> (B, H, W, C)."""
    wh, ww = window_size
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // wh) * (w // ww))
    x = windows.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shift_mask(
    padded_hw: tuple[int, int], window_size: tuple[int, int], shift_size: tuple[int, int], device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(nW, N, N) additive mask of the official code: 0 where the two tokens' region labels match, else -100."""
    labels = shift_region_labels(padded_hw, window_size, shift_size, device)
    lw = window_partition(labels[None, :, :, None], window_size)[..., 0]  # nW, N
    diff = lw[:, None, :] - lw[:, :, None]
    return torch.zeros(diff.shape, dtype=dtype, device=device).masked_fill(diff != 0, -100.0)


def gather_relative_bias(bias_table: torch.Tensor, window_size: tuple[int, int]) -> torch.Tensor:
    """((2Wh-1)(2Ww-1), heads) table -> (heads, N, N) bias."""
    n = window_size[0] * window_size[1]
    idx = relative_position_index(window_size, bias_table.device)
    return bias_table[idx.reshape(-1)].view(n, n, -1).permute(2, 0, 1)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: tuple[int, int],
    bias_table: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention inside windows, as the official ``WindowAttention.forward`` computes it.

    q, k, v: (B*nW, heads, N, head_dim); mask: additive (nW, N, N), window b uses ``mask[b % nW]``.
    Returns (B*nW, heads, N, head_dim) in the dtype of q. A query whose logits are all -inf gets 0.
    """
    bw, heads, n, hd = q.shape
    scale = hd**-0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias_table is not None:
        attn = attn + gather_relative_bias(bias_table, window_size).to(attn.dtype).unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.view(bw // nw, nw, heads, n, n) + mask.to(attn.dtype)[None, :, None]
        attn = attn.view(bw, heads, n, n)
    # A query whose every logit is -inf (a mask hiding all keys) gets output 0 and zero gradients, as
    # PyTorch's SDPA math path (_safe_softmax) and FlexAttention define it; other rows are bitwise untouched.
    empty = attn.amax(dim=-1, keepdim=True) == float("-inf")
    attn = attn.masked_fill(empty, 0.0).softmax(dim=-1).masked_fill(empty, 0.0)
    return attn @ v


def shifted_window_attention(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: tuple[int, int],
    shift_size: tuple[int, int],
    bias_table: torch.Tensor | None = None,
    scale: float | None = None,
    pad_qkv: torch.Tensor | None = None,
    roll_before_pad: bool = False,
) -> torch.Tensor:
    """Shifted-window attention on the (B, H, W, 3C) output of the qkv Linear; returns (B, H, W, C).

    Official EsViT order (``roll_before_pad=False``): pad right/bottom to a multiple of the window with
    ``pad_qkv`` (zeros when None), roll by -shift, partition, attend with the shift mask, reverse, roll by
    +shift, crop. timm order (``roll_before_pad=True``): roll the unpadded map, then pad; reverse, crop,
    roll back. The two agree when H and W are multiples of the window.
    """
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    wh, ww = window_size
    sh, sw = shift_size
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww

    def pad(x: torch.Tensor) -> torch.Tensor:
        if (hp, wp) == (h, w):
            return x
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        if pad_qkv is not None:  # a select: 0 * a NaN pad vector must not reach the real tokens
            outside = torch.ones(hp, wp, dtype=torch.bool, device=x.device)
            outside[:h, :w] = False
            x = torch.where(outside[None, :, :, None], pad_qkv.to(x.dtype), x)
        return x

    x = qkv
    if roll_before_pad:
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        x = pad(x)
    else:
        x = pad(x)
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    windows = window_partition(x, window_size)  # B*nW, N, 3C
    bw, n, _ = windows.shape
    q, k, v = windows.view(bw, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    mask = shift_mask((hp, wp), window_size, shift_size, qkv.device) if (sh or sw) else None
    out = window_attention(q, k, v, window_size, bias_table, mask, scale)
    out = window_reverse(out.transpose(1, 2).reshape(bw, n, c), window_size, hp, wp)
    if roll_before_pad:
        out = out[:, :h, :w]
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    else:
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        out = out[:, :h, :w]
    return out.contiguous()
