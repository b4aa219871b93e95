"""Eager PyTorch reference for Vision Longformer's (ViL) 3x3-window attention: the oracle of the fused op.

The semantics are those of the official ``Long2DSCSelfAttention`` (EsViT / ViL code), local-query path:

* the (H, W) map is zero-padded right/bottom to (Hp, Wp), multiples of the window w, and split into an
  (mx, my) grid of w x w windows;
* a query in window (m, n) attends to the keys of the windows (m + dm, n + dn) of the neighbour *chunks*
  c = 0..8, (dm, dn) = (c // 3 - 1, c % 3 - 1) (chunk 4 is the window itself), plus the G global keys;
  ``neighbor`` (the official ``mode``) picks the chunks: 0 -> all 9, -1 -> chunk 4 only, k in 1..8 -> chunk
  4 and chunk ``k - 1 if k <= 4 else k`` (the 8 neighbours in row-major order, skipping the centre);
* relative-position bias: for query (li, lj) of its window and key (ki, kj) of chunk (dm, dn), entry
  (li - ki - dm*w + 2w - 1) * (4w - 1) + (lj - kj - dn*w + 2w - 1) of the ((4w-1)^2, heads) table;
* ``exact`` (the official ``mask_invalid_locations`` modes), with (kr, kc) the key's position on the padded
  map *before* any wrap-around, (qr, qc) the query's, and (H, W) the unpadded size:
    - 0 (zero padding, the ViL configs' ``SW_EXACT``): a key is valid iff 0 <= kr < H and 0 <= kc < W;
    - -1 (cyclic): the neighbour grid wraps around (windows taken modulo (mx, my)); a key is invalid iff
      H <= kr < Hp or W <= kc < Wp (padding reached without wrapping; the official mask leaves the padding
      reached by wrapping unmasked, with zero keys and values, and so does this reference);
    - 1 (exact sliding window, only with neighbor 0): valid iff 0 <= kr < H, 0 <= kc < W, |kr - qr| <= w
      and |kc - qc| <= w;
* softmax jointly over [global keys, local keys]; invalid keys get -inf.

The output is cropped back to (H, W). Everything is materialised here (gathered windows, the index and
the mask); the fused kernels gather by index arithmetic instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "NEIGHBOR_MODES",
    "EXACT_MODES",
    "neighbor_chunks",
    "neighborhood_relative_index",
    "neighborhood_valid",
    "neighborhood_window_attention",
    "global_token_attention",
]

NEIGHBOR_MODES = (-1, 0, 1, 2, 3, 4, 5, 6, 7, 8)
EXACT_MODES = (-1, 0, 1)


def neighbor_chunks(neighbor: int) -> tuple[int, ...]:
    """The chunks (0..8, row-major over the 3x3 neighbourhood, 4 = own window) of official ``mode``."""
    if neighbor == 0:
        return tuple(range(9))
    if neighbor == -1:
        return (4,)
    if 1 <= neighbor <= 8:
        return (4, neighbor - 1 if neighbor <= 4 else neighbor)
    raise ValueError(f"neighbor must be one of {NEIGHBOR_MODES}, got {neighbor!r}")


def _offsets(chunks: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(c // 3 - 1, c % 3 - 1) for c in chunks]


def neighborhood_relative_index(window: int, chunks: tuple[int, ...], device=None) -> torch.Tensor:
    """(w*w, len(chunks)*w*w) index into the ((4w-1)^2, heads) table: query token l, key (chunk, token t)."""
    w = window
    li = torch.arange(w * w, device=device) // w
    lj = torch.arange(w * w, device=device) % w
    parts = []
    for dm, dn in _offsets(chunks):
        dr = li[:, None] - (li[None, :] + dm * w) + 2 * w - 1
        dc = lj[:, None] - (lj[None, :] + dn * w) + 2 * w - 1
        parts.append(dr * (4 * w - 1) + dc)
    return torch.cat(parts, dim=1)


def neighborhood_valid(
    hw: tuple[int, int], window: int, chunks: tuple[int, ...], exact: int, device=None
) -> torch.Tensor:
    """(mx, my, w*w, len(chunks)*w*w) bool: True where query l of window (m, n) may attend key (chunk, t)."""
    h, wd = hw
    w = window
    mx, my = -(-h // w), -(-wd // w)
    hp, wp = mx * w, my * w
    m = torch.arange(mx, device=device)[:, None, None, None]
    n = torch.arange(my, device=device)[None, :, None, None]
    tok = torch.arange(w * w, device=device)
    qr = m * w + (tok // w)[None, None, :, None]
    qc = n * w + (tok % w)[None, None, :, None]
    parts = []
    for dm, dn in _offsets(chunks):
        kr = (m + dm) * w + (tok // w)[None, None, None, :]  # unwrapped key position on the padded map
        kc = (n + dn) * w + (tok % w)[None, None, None, :]
        if exact == 0:
            ok = (kr >= 0) & (kr < h) & (kc >= 0) & (kc < wd)
        elif exact == -1:
            ok = ~(((kr >= h) & (kr < hp)) | ((kc >= wd) & (kc < wp)))
        elif exact == 1:
            ok = (kr >= 0) & (kr < h) & (kc >= 0) & (kc < wd) & ((kr - qr).abs() <= w) & ((kc - qc).abs() <= w)
        else:
            raise ValueError(f"exact must be one of {EXACT_MODES}, got {exact!r}")
        parts.append(ok.expand(mx, my, w * w, w * w))
    return torch.cat(parts, dim=-1)


def _windows(x: torch.Tensor, heads: int, w: int) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B, heads, mx, my, w*w, head_dim)."""
    b, hp, wp, c = x.shape
    x = x.view(b, hp // w, w, wp // w, w, heads, c // heads)
    return x.permute(0, 5, 1, 3, 2, 4, 6).reshape(b, heads, hp // w, wp // w, w * w, c // heads)


def neighborhood_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    window_size: int,
    global_k: torch.Tensor | None = None,
    global_v: torch.Tensor | None = None,
    local_bias_table: torch.Tensor | None = None,
    global_bias: torch.Tensor | None = None,
    neighbor: int = 0,
    scale: float | None = None,
    exact: int = 0,
) -> torch.Tensor:
    """ViL local-query attention, eagerly (see the module docstring): q, k, v (B, H, W, C), global_k/v
    (B, G, C), local_bias_table ((4w-1)^2, heads), global_bias (heads, G). Returns (B, H, W, C) in q's
    dtype. A query whose logits are all -inf would get 0 (cannot happen in the official modes)."""
    if exact == 1 and neighbor != 0:
        raise ValueError("exact=1 (exact sliding window) is defined only for neighbor=0, as in the official code")
    b, h, wd, c = q.shape
    w = window_size
    hd = c // num_heads
    scale = hd**-0.5 if scale is None else scale
    mx, my = -(-h // w), -(-wd // w)
    hp, wp = mx * w, my * w
    chunks = neighbor_chunks(neighbor)

    def prep(x: torch.Tensor) -> torch.Tensor:
        return _windows(F.pad(x, (0, 0, 0, wp - wd, 0, hp - h)), num_heads, w)

    qw = prep(q) * scale  # (B, h, mx, my, L, d)
    kw, vw = prep(k), prep(v)
    ks, vs = [], []
    for dm, dn in _offsets(chunks):  # key window (m + dm, n + dn), the grid taken cyclically (masked below)
        rows = (torch.arange(mx, device=q.device) + dm) % mx
        cols = (torch.arange(my, device=q.device) + dn) % my
        ks.append(kw[:, :, rows][:, :, :, cols])
        vs.append(vw[:, :, rows][:, :, :, cols])
    kn = torch.cat(ks, dim=-2)  # (B, h, mx, my, len(chunks)*L, d)
    vn = torch.cat(vs, dim=-2)
    attn = torch.einsum("bhmnld,bhmntd->bhmnlt", qw, kn)
    if local_bias_table is not None:
        idx = neighborhood_relative_index(w, chunks, q.device)
        bias = local_bias_table[idx].permute(2, 0, 1).to(attn.dtype)  # (heads, L, K)
        attn = attn + bias[None, :, None, None]
    valid = neighborhood_valid((h, wd), w, chunks, exact, q.device)
    attn = attn.masked_fill(~valid[None, None], float("-inf"))
    g = 0 if global_k is None else global_k.shape[1]
    if g:
        gk = global_k.reshape(b, g, num_heads, hd).transpose(1, 2)  # (B, h, G, d)
        gv = global_v.reshape(b, g, num_heads, hd).transpose(1, 2)
        attn_g = torch.einsum("bhmnld,bhgd->bhmnlg", qw, gk)
        if global_bias is not None:
            attn_g = attn_g + global_bias.to(attn.dtype)[None, :, None, None, None, :]
        attn = torch.cat([attn_g, attn], dim=-1)
    empty = attn.amax(dim=-1, keepdim=True) == float("-inf")
    p = attn.masked_fill(empty, 0.0).softmax(dim=-1).masked_fill(empty, 0.0)
    out = torch.einsum("bhmnlt,bhmntd->bhmnld", p[..., g:], vn)
    if g:
        out = out + torch.einsum("bhmnlg,bhgd->bhmnld", p[..., :g], gv)
    # (B, h, mx, my, w, w, d) -> (B, mx, w, my, w, h, d) -> crop
    out = out.view(b, num_heads, mx, my, w, w, hd).permute(0, 2, 4, 3, 5, 1, 6).reshape(b, hp, wp, c)
    return out[:, :h, :wd]


def global_token_attention(
    q_g: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention of G global queries (B, G, C) over all N tokens k, v (B, N, C) with an optional
    (heads, G, N) bias; returns (B, G, C) in q_g's dtype."""
    b, g, c = q_g.shape
    n = k.shape[1]
    hd = c // num_heads
    scale = hd**-0.5 if scale is None else scale
    qh = q_g.reshape(b, g, num_heads, hd).transpose(1, 2) * scale
    kh = k.reshape(b, n, num_heads, hd).transpose(1, 2)
    vh = v.reshape(b, n, num_heads, hd).transpose(1, 2)
    attn = qh @ kh.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.to(attn.dtype)[None]
    return (attn.softmax(dim=-1) @ vh).transpose(1, 2).reshape(b, g, c)
