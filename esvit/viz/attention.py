"""Attention maps of the last stage, per head, recomputed with the eager reference math.

The fused kernels never materialise the attention probabilities, so a forward pre-hook records the input
of the backbone's last block and the probabilities are recomputed from that block's own parameters:
``softmax(q * scale @ k^T + relative-position bias)`` (Swin, :mod:`esvit_kernels.reference.window`; ViL,
whose last stage runs full attention, with its global-token biases) or ``softmax(q * scale @ k^T)`` (ViT).
At the model's training resolution Swin's last stage is one window covering the whole map (no shift), so
every head has one attention matrix over the whole image.

The map shown for a head is, for each image position (key), the attention it receives averaged over all
query positions (``query="mean"``, the default: where the head looks overall); ``query="center"`` shows the
attention of the centre token instead and ``query="cls"`` (ViT) that of the CLS token, as DINO draws it.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from esvit_kernels.reference.window import gather_relative_bias, window_partition

from ..eval.transforms import denormalize
from ..models import SwinTransformer, VisionLongformer, VisionTransformer
from ..models.vil import FullAttention

__all__ = ["QUERIES", "attention_maps", "draw_attention", "last_block_attention"]

QUERIES = ("mean", "center", "cls")


class _Capture:
    def __init__(self) -> None:
        self.args: tuple = ()

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)


@torch.no_grad()
def last_block_attention(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], bool]:
    """Attention probabilities of the backbone's last block: ((B, heads, L, L), token grid (h, w), has_cls).

    For a ViT, L = 1 + h*w (CLS first); for Swin, L = h*w (row-major); for ViL, h*w or, when its last stage has
    global tokens, 1 + h*w (the first global token in the CLS place; other global tokens left out). ResNets
    have no attention.
    """
    if isinstance(backbone, SwinTransformer):
        block = backbone.layers[-1].blocks[-1]
    elif isinstance(backbone, VisionTransformer):
        block = backbone.blocks[-1]
    elif isinstance(backbone, VisionLongformer):
        block = backbone.layers[-1][-2]  # the last attention block (its MLP block follows)
        if not isinstance(block.attn, FullAttention):
            raise TypeError("this ViL's last stage runs the sparse neighbourhood attention: only a full-attention "
                            "last stage (s0, as in every preset) has one attention matrix over the image")
    else:
        raise TypeError(f"{type(backbone).__name__} has no attention to show (Swin, ViT and ViL backbones do)")
    cap = _Capture()
    handle = block.register_forward_pre_hook(cap)
    try:
        backbone(x)
    finally:
        handle.remove()
    tokens = cap.args[0]
    if isinstance(backbone, SwinTransformer):
        return _swin_attention(block, tokens, cap.args[1]), cap.args[1], False
    if isinstance(backbone, VisionLongformer):
        probs, g = _vil_attention(block, tokens, cap.args[1]), block.attn.num_global
        keep = torch.cat([torch.zeros(min(g, 1), dtype=torch.long), torch.arange(g, tokens.shape[1])])
        return probs[:, :, keep][:, :, :, keep], tuple(cap.args[1]), g > 0
    grid = (x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size)
    return _vit_attention(block, tokens), grid, True


def _swin_attention(block: nn.Module, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    attn = block.attn
    wh, ww = attn.window_size
    if tuple(hw) != (wh, ww) or block.shift_size:
        raise ValueError(f"the last stage's map is {hw[0]}x{hw[1]} tokens but its window is {wh}x{ww}: attention "
                         "maps over the whole image need the model's training resolution (one window, no shift)")
    b, n, c = tokens.shape
    y = block.norm1(tokens).view(b, hw[0], hw[1], c)
    qkv = window_partition(attn.qkv(y), (wh, ww))  # (B, N, 3 * heads * hd): one window per image
    q, k, _ = qkv.view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    logits = logits + gather_relative_bias(attn.relative_position_bias_table, (wh, ww)).unsqueeze(0)
    return logits.softmax(dim=-1)


def _vil_attention(block: nn.Module, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    attn = block.attn
    b, n, c = tokens.shape
    hd = c // attn.num_heads
    q, k, _ = attn.qkv(block.norm(tokens)).view(b, n, 3, attn.num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * hd**-0.5) @ k.transpose(-2, -1)
    if attn.rpe:
        logits = logits + attn.attention_bias(hw[0] * hw[1])
    return logits.softmax(dim=-1)


def _vit_attention(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    attn = block.attn
    b, n, c = tokens.shape
    hd = c // attn.num_heads
    q, k, _ = attn.qkv(block.norm1(tokens)).view(b, n, 3, attn.num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    return ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)


def attention_maps(probs: torch.Tensor, grid: tuple[int, int], has_cls: bool, query: str = "mean") -> torch.Tensor:
    """(B, heads, h, w) maps from :func:`last_block_attention`'s probabilities (see the module docstring)."""
    if query not in QUERIES:
        raise ValueError(f"query must be one of {QUERIES}, got {query!r}")
    h, w = grid
    if has_cls:
        if query == "cls":
            rows = probs[:, :, 0, 1:]
        elif query == "center":
            rows = probs[:, :, 1 + (h // 2) * w + w // 2, 1:]
        else:
            rows = probs[:, :, 1:, 1:].mean(dim=2)
    else:
        if query == "cls":
            raise ValueError("query 'cls' needs a CLS token (a ViT, or a ViL whose last stage has a global token); "
                             "use 'mean' or 'center'")
        rows = probs[:, :, (h // 2) * w + w // 2, :] if query == "center" else probs.mean(dim=2)
    return rows.reshape(*rows.shape[:2], h, w)


def draw_attention(
    x: torch.Tensor, maps: torch.Tensor, path: str | os.PathLike, *, panel: int = 192, cols: int = 6,
    title: str = "",
) -> tuple[int, int]:
    """Write a PNG: the image, then one panel per head with its map (upsampled, colour-mapped) over the image.
    ``x`` (1, 3, H, W) normalised, ``maps`` (heads, h, w). Returns the PNG's (width, height) in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = maps.shape[0]
    n = heads + 1
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    band, dpi = 40, 100
    width, height = cols * panel, rows * panel + band
    img = F.interpolate(denormalize(x[0])[None], size=(panel, panel), mode="bilinear", align_corners=False)[0]
    img = img.permute(1, 2, 0).numpy()
    up = F.interpolate(maps[None].float(), size=(panel, panel), mode="nearest")[0]
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    for i in range(n):
        r, c = divmod(i, cols)
        ax = fig.add_axes((c * panel / width, 1 - (band + (r + 1) * panel) / height, panel / width, panel / height))
        ax.axis("off")
        if i == 0:
            ax.imshow(img, interpolation="nearest")
            ax.text(4, 14, "image", color="white", fontsize=8, backgroundcolor="black")
            continue
        m = up[i - 1]
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        ax.imshow(img, interpolation="nearest")
        ax.imshow(m.numpy(), cmap="inferno", alpha=0.6, interpolation="nearest", vmin=0, vmax=1)
        ax.text(4, 14, f"head {i}  max {float(maps[i - 1].max()):.2f}", color="white", fontsize=7,
                backgroundcolor="black")
    note = f"colours: min-max per head; uniform attention = 1/{maps.shape[-2] * maps.shape[-1]} = " \
           f"{1 / (maps.shape[-2] * maps.shape[-1]):.2f}"
    fig.text(0.5, 1 - band / height / 2, f"{title}\n{note}" if title else note, ha="center", va="center", fontsize=8)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return width, height
