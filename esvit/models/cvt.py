"""EsViT's windowed CvT (the official ``cvt_v4_transformer``) on the fused window attention.

Table 8's third sparse attention. Four stages, each a convolutional token embedding (conv + LayerNorm)
followed by pre-norm blocks; a block's attention takes q, k and v from a *convolutional projection*
(depthwise 3x3 conv, BatchNorm, pointwise 1x1 conv to 3C) and attends inside non-overlapping windows, so
"features in neighbouring windows are considered in the convolutional projection". The MLP uses QuickGELU
(``x * sigmoid(1.702 x)``), LayerNorms have eps 1e-5, the logit scale is ``dim ** -0.5`` (the whole
embedding dim, not the head dim, as the official module has it).

Windows follow the official forward: a map of H x W runs with window ``w = min(window_size, H, W)``;
after LN1 it is zero-padded right/bottom to a multiple of ``w`` and the projection runs on the padded
map, so padding tokens carry the projection's output there (the conv sees their real neighbours, the
BatchNorm and pointwise biases) and are *not* masked; the output is cropped back to H x W. The projected
(B, Hp, Wp, 3C) map (channels ordered (3, heads, head_dim), the official ``chunk(3)`` then ``(h d)``) goes
straight to :func:`esvit_kernels.functional.shifted_window_attention`.

Options the official variants switch on (s1 has both off, and Table 8's CvT is s1):

- ``rel_pos_embed``: a ((2 window_size - 1)^2, heads) relative-position bias table per block. When the
  map is smaller than the window (w < window_size: the 96-px crops' last stages) the official module
  fails (its 49 x 49 bias does not fit the w^2 x w^2 logits); here the block uses the sub-table of the
  offsets a w-window holds, which is the same bias restricted to the smaller window.
- ``shift``: Swin's shifted windows (roll by -w // 2 with the shift mask, on odd blocks, on each axis
  that holds more than one window), fused in the kernel. The official switch does *not* do this: its
  ``shift_size`` (a one-element tuple by a stray comma) is never read, and instead the shift mask of a
  window_size-padded map is added, unrolled, in every block of the stage -- which also fails on maps
  smaller than the window. We take the Swin semantics the switch is named after (see README).

Region tokens are the final stage's tokens after the final LayerNorm; the view feature is their mean (the
official ``avg_pool`` of the normed map).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from esvit_kernels.functional import shifted_window_attention

from .convert import _unwrap
from .layers import DropPath, drop_path_schedule

__all__ = ["CVT_ARCHS", "CvTArch", "CvTAttention", "CvTTransformer", "QuickGELU", "convert_cvt_state_dict",
           "cvt_window", "min_input_size"]


@dataclass(frozen=True)
class CvTArch:
    """Size of a CvT variant: per-stage token embedding (patch, stride, padding), dims, heads, depths."""

    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    patch_sizes: tuple[int, ...]
    patch_strides: tuple[int, ...]
    patch_paddings: tuple[int, ...]
    drop_path_rate: float = 0.1
    shift: bool = False
    rel_pos_embed: bool = False


_S1 = {"embed_dims": (64, 192, 384, 768), "depths": (2, 2, 6, 2), "num_heads": (1, 3, 6, 12),
       "patch_sizes": (7, 3, 3, 3), "patch_strides": (4, 2, 2, 2), "patch_paddings": (2, 1, 1, 1)}

CVT_ARCHS: dict[str, CvTArch] = {
    # tiny preset for the CPU tests and demo: 3 stages (stride 4/2/2), ~0.6M parameters
    "cvt_micro": CvTArch((32, 64, 128), (2, 2, 2), (1, 2, 4), (7, 3, 3), (4, 2, 2), (2, 1, 1)),
    # experiments/imagenet/cvt_v4/s1*.yaml (Table 8 is s1)
    "cvt_v4_s1": CvTArch(**_S1),
    "cvt_v4_s1_rpe": CvTArch(**_S1, rel_pos_embed=True),
    "cvt_v4_s1_shift": CvTArch(**_S1, shift=True),
    "cvt_v4_s1_rpe_shift": CvTArch(**_S1, shift=True, rel_pos_embed=True),
}


def cvt_window(h: int, w: int, window_size: int) -> tuple[int, int, int]:
    """(window, padded H, padded W) of an h x w map: the official ``min(window_size, H, W)`` square window
    and the right/bottom zero padding to a multiple of it."""
    win = min(window_size, h, w)
    return win, -(-h // win) * win, -(-w // win) * win


def min_input_size(patch_sizes: tuple[int, ...], strides: tuple[int, ...], paddings: tuple[int, ...]) -> int:
    """Smallest input side (px) that every strided token embedding maps to at least one token."""
    size = 1
    for k, s, p in reversed(list(zip(patch_sizes, strides, paddings))):
        size = max((size - 1) * s + k - 2 * p, 1)
    return size


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the official CvT activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ConvEmbed(nn.Module):
    """Overlapping strided convolution, then LayerNorm over channels: (B, C_in, H, W) -> (B, H', W', C)."""

    def __init__(self, patch_size: int, stride: int, padding: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvProjection(nn.Module):
    """Depthwise kxk conv (no bias) -> BatchNorm -> pointwise 1x1 to ``dim_out``: (B, H, W, C) -> (B, H, W, dim_out)."""

    def __init__(self, dim: int, dim_out: int, kernel_size: int, padding: int, bias: bool) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.pw = nn.Linear(dim, dim_out, bias=bias)  # the official 1x1 Conv2d, channels-last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.dw(x.permute(0, 3, 1, 2)))
        return self.pw(y.permute(0, 2, 3, 1))


class CvTAttention(nn.Module):
    """Convolutional projection + window attention (fused) + output projection on a (B, H, W, C) map.

    Args:
        dim: channels C (dim_in = dim_out, as in every official config).
        num_heads: heads; C must be a multiple of it.
        window_size: the configured window; a smaller map uses ``min(window_size, H, W)`` (see the module doc).
        shift: shifted windows (Swin semantics) in this block.
        rel_pos_embed: learn a relative-position bias table.
        qkv_bias: bias of the pointwise projection.
        kernel_size, padding: the depthwise projection's kernel and padding (3 and 1 in every config).
        backend: window-attention backend of :mod:`esvit_kernels` ("auto" | "triton" | "cuda" | "torch").
    """

    def __init__(
        self, dim: int, num_heads: int, window_size: int, *, shift: bool = False, rel_pos_embed: bool = False,
        qkv_bias: bool = True, kernel_size: int = 3, padding: int = 1, backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be a positive multiple of num_heads {num_heads}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        self.shift = shift
        self.scale = dim**-0.5
        self.backend = backend
        self.qkv = ConvProjection(dim, 3 * dim, kernel_size, padding, qkv_bias)
        self.proj = nn.Linear(dim, dim)  # the official 1x1 ``proj_out``
        self.rel_pos_bias_table = (
            nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads)) if rel_pos_embed else None
        )

    def bias_table(self, win: int) -> torch.Tensor | None:
        """The ((2 win - 1)^2, heads) table of a win-window: the rows of the full table whose offsets fit."""
        t = self.rel_pos_bias_table
        if t is None or win == self.window_size:
            return t
        side, off = 2 * self.window_size - 1, self.window_size - win
        rows = torch.arange(off, off + 2 * win - 1, device=t.device)
        return t[(rows[:, None] * side + rows[None, :]).reshape(-1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) (LN1 output). Returns (B, H, W, C)."""
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"expected a (B, H, W, {self.dim}) map, got {tuple(x.shape)}")
        _, h, w, _ = x.shape
        win, hp, wp = cvt_window(h, w, self.window_size)
        if hp != h or wp != w:
            x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        qkv = self.qkv(x)
        shift = (win // 2 if self.shift and hp > win else 0, win // 2 if self.shift and wp > win else 0)
        out = shifted_window_attention(
            qkv, num_heads=self.num_heads, window_size=win, shift_size=shift, bias_table=self.bias_table(win),
            scale=self.scale, backend=self.backend,
        )
        return self.proj(out[:, :h, :w])

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, shift={self.shift}, "
                f"rel_pos_embed={self.rel_pos_bias_table is not None}, backend={self.backend!r}")


class CvTBlock(nn.Module):
    """x + DropPath(attn(LN(x))); x + DropPath(MLP(LN(x))) on a (B, H, W, C) map."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, drop_path: float, *,
                 shift: bool, rel_pos_embed: bool, backend: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = CvTAttention(dim, num_heads, window_size, shift=shift, rel_pos_embed=rel_pos_embed,
                                 backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), QuickGELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CvTStage(nn.Module):
    """Token embedding, then the stage's blocks (shift, when on, on the odd ones)."""

    def __init__(self, embed: ConvEmbed, blocks: list[CvTBlock]) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)


def init_cvt_weights(m: nn.Module) -> None:
    """Official ``trunc_norm`` init: trunc-normal(0.02) Linear/Conv2d weights, zero biases; norms 1 / 0."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, CvTAttention) and m.rel_pos_bias_table is not None:
        nn.init.trunc_normal_(m.rel_pos_bias_table, std=0.02)


class CvTTransformer(nn.Module):
    """Windowed CvT backbone returning ``(view_feature (B, C), region_tokens (B, L, C))``.

    Args:
        embed_dims, depths, num_heads: per stage.
        patch_sizes, patch_strides, patch_paddings: per-stage convolutional token embedding.
        window_size: attention window of every stage (7 in the official configs).
        mlp_ratio: MLP hidden / dim.
        drop_path_rate: final stochastic-depth rate (linear over all blocks; 0 for the teacher).
        shift, rel_pos_embed: the official variants' switches (see the module docstring).
        backend: window-attention backend of :mod:`esvit_kernels`.
        use_checkpoint: recompute each block in the backward pass.
    """

    def __init__(
        self, *, embed_dims: tuple[int, ...] = (64, 192, 384, 768), depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (1, 3, 6, 12), patch_sizes: tuple[int, ...] = (7, 3, 3, 3),
        patch_strides: tuple[int, ...] = (4, 2, 2, 2), patch_paddings: tuple[int, ...] = (2, 1, 1, 1),
        window_size: int = 7, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, shift: bool = False,
        rel_pos_embed: bool = False, in_chans: int = 3, backend: str = "auto", use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        per_stage = (embed_dims, depths, num_heads, patch_sizes, patch_strides, patch_paddings)
        if len({len(t) for t in per_stage}) != 1 or not depths:
            raise ValueError(f"embed_dims, depths, num_heads, patch_sizes, patch_strides and patch_paddings need "
                             f"one entry per stage, got lengths {[len(t) for t in per_stage]}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.depths, self.window_size = tuple(depths), window_size
        self.patch_sizes, self.patch_strides, self.patch_paddings = patch_sizes, patch_strides, patch_paddings
        self.use_checkpoint = use_checkpoint
        self.num_features = embed_dims[-1]
        dpr = drop_path_schedule(drop_path_rate, sum(depths))
        stages, prev = [], in_chans
        for i, (dim, depth, heads) in enumerate(zip(embed_dims, depths, num_heads)):
            start = sum(depths[:i])
            blocks = [CvTBlock(dim, heads, window_size, mlp_ratio, dpr[start + j], shift=shift and j % 2 == 1,
                               rel_pos_embed=rel_pos_embed, backend=backend) for j in range(depth)]
            stages.append(CvTStage(ConvEmbed(patch_sizes[i], patch_strides[i], patch_paddings[i], prev, dim), blocks))
            prev = dim
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(self.num_features, eps=1e-5)
        self.apply(init_cvt_weights)

    def min_input_size(self) -> int:
        """Smallest input side (px) whose every stage embeds to at least one token."""
        return min_input_size(self.patch_sizes, self.patch_strides, self.patch_paddings)

    def _run_block(self, blk: CvTBlock, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled() and self.training:
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def _blocks(self, x: torch.Tensor):
        """Yield (stage index, block output (B, H, W, C)) for every block, in order."""
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_input_size():
            raise ValueError(f"a {tuple(x.shape[-2:])} input is smaller than the {self.min_input_size()} px "
                             "this CvT needs for one token in its last stage")
        for i, stage in enumerate(self.stages):
            x = stage.embed(x if i == 0 else x.permute(0, 3, 1, 2))
            for blk in stage.blocks:
                x = self._run_block(blk, x)
                yield i, x

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Final-LayerNorm tokens of the last stage (B, L, C), row-major, and their grid (H, W)."""
        (_, x), = deque(self._blocks(x), maxlen=1)
        return self.norm(x.flatten(1, 2)), (x.shape[1], x.shape[2])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) -> (view feature = mean of the region tokens (B, C), region tokens (B, L, C))."""
        regions, _ = self.forward_features(x)
        return regions.mean(dim=1), regions

    def forward_return_n_last_blocks(self, x: torch.Tensor, n: int = 4) -> torch.Tensor:
        """Concat of the mean-pooled tokens of the last ``n`` blocks (the official eval: blocks of the last
        stage get the final norm)."""
        if not 1 <= n <= sum(self.depths):
            raise ValueError(f"n must be in [1, {sum(self.depths)}], got {n}")
        last = len(self.stages) - 1
        outs = list(self._blocks(x))[-n:]
        return torch.cat([(self.norm(t) if i == last else t).mean(dim=(1, 2)) for i, t in outs], dim=-1)


# official cvt_v4 names -> ours (after the ``module.`` / ``backbone.`` prefixes are stripped)
_OFFICIAL_KEYS = (
    (r"^stage(\d+)\.0\.", r"stages.\1.embed."),
    (r"^stage(\d+)\.1\.layers\.(\d+)\.0\.norm\.", r"stages.\1.blocks.\2.norm1."),
    (r"^stage(\d+)\.1\.layers\.(\d+)\.0\.fn\.proj_out\.", r"stages.\1.blocks.\2.attn.proj."),
    (r"^stage(\d+)\.1\.layers\.(\d+)\.0\.fn\.", r"stages.\1.blocks.\2.attn."),
    (r"^stage(\d+)\.1\.layers\.(\d+)\.1\.norm\.", r"stages.\1.blocks.\2.norm2."),
    (r"^stage(\d+)\.1\.layers\.(\d+)\.1\.fn\.net\.", r"stages.\1.blocks.\2.mlp."),
)


def convert_cvt_state_dict(state_dict: Mapping[str, torch.Tensor], which: str = "teacher") -> dict[str, torch.Tensor]:
    """Official cvt_v4 / EsViT CvT weights (a backbone state dict or a training checkpoint's ``which``) -> our
    backbone's state dict: keys renamed, 1x1 convolutions (qkv ``pw``, ``proj_out``, the MLP) as Linear weights,
    the classifier / projection heads and the derived ``rel_pos_idx`` dropped."""
    out: dict[str, torch.Tensor] = {}
    for k, v in _unwrap(state_dict, which).items():
        for prefix in ("module.", "_orig_mod.", "backbone."):
            k = k.removeprefix(prefix)
        if k.startswith(("head.", "head_dense.")) or k.endswith("rel_pos_idx"):
            continue
        for pattern, repl in _OFFICIAL_KEYS:
            k = re.sub(pattern, repl, k)
        if re.search(r"\.(attn\.qkv\.pw|attn\.proj|mlp\.\d)\.weight$", k) and v.dim() == 4:
            v = v[:, :, 0, 0]
        out[k] = v
    return out
