"""Swin Transformer backbone as the official EsViT code runs it, on the fused window attention.

Follows ../shared/DESIGN.md section 2: 4x4 patch embedding + LayerNorm, pre-norm blocks with (shifted)
window attention and a GELU MLP, patch merging between stages, a final LayerNorm whose tokens are the
region features and whose token mean is the view feature. LayerNorm eps 1e-6, qkv bias, no absolute
position embedding, no dropout, drop path growing linearly over all blocks.

Window and shift of every stage are fixed at construction from ``img_size`` (the global crop size): a
stage whose resolution ``img_size / patch / 2**i`` is <= ``window_size`` uses window = that resolution
and no shift; otherwise ``window_size``, with shift ``window_size // 2`` on odd blocks. Smaller crops (the
local views) run through the same blocks: after LN1 their map is zero-padded right/bottom to a multiple
of the window -- padding tokens carry the qkv bias and are *not* masked -- then rolled (pad before roll),
which :meth:`esvit_kernels.nn.WindowAttention.forward_map` does inside the kernel. The shift mask is the
one of the crop's own padded map (as the later official code computes it per resolution).

Parameter names are the official Swin / EsViT ones (downsample at the *end* of a stage), so official
checkpoints load unchanged and timm's load through :func:`esvit.models.convert.convert_swin_state_dict`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from esvit_kernels.nn import WindowAttention

from .layers import DropPath, Mlp, drop_path_schedule, init_transformer_weights

__all__ = ["SWIN_ARCHS", "SwinArch", "SwinTransformer", "stage_window"]


@dataclass(frozen=True)
class SwinArch:
    """Size of a Swin variant (DESIGN.md table; head dim is 32 everywhere)."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    drop_path_rate: float
    stem: str = "patch"


SWIN_ARCHS: dict[str, SwinArch] = {
    # tiny preset for the CPU demo and the tests: 3 stages, ~0.6M parameters, 64-px global / 32-px local crops
    "swin_micro": SwinArch(32, (2, 2, 2), (1, 2, 4), 0.1),
    # the same with a convolutional stem: learns in the few hundred steps a CPU demo affords (see ConvStem)
    "swin_micro_conv": SwinArch(32, (2, 2, 2), (1, 2, 4), 0.1, stem="conv"),
    "swin_tiny": SwinArch(96, (2, 2, 6, 2), (3, 6, 12, 24), 0.1),
    "swin_small": SwinArch(96, (2, 2, 18, 2), (3, 6, 12, 24), 0.2),
    "swin_base": SwinArch(128, (2, 2, 18, 2), (4, 8, 16, 32), 0.2),
}


def stage_window(resolution: int, window_size: int) -> tuple[int, int]:
    """(window, shift) of a stage with a ``resolution`` x ``resolution`` map at the configured image size."""
    if resolution <= window_size:
        return max(resolution, 1), 0
    return window_size, window_size // 2


class PatchEmbed(nn.Module):
    """patch x patch stride-patch convolution, then LayerNorm over channels; returns tokens and (H, W)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_eps: float) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convolutions (GroupNorm(1) + GELU) and a 1x1 projection, then LayerNorm: a drop-in
    for the 4x4 patch embedding (same token grid) with the locality prior of "Early Convolutions Help
    Transformers See Better" (Xiao et al. 2021). Not in the paper: it is what lets the tiny CPU-demo Swin
    learn within minutes. GroupNorm (not BatchNorm) keeps every sample independent of its batch."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_eps: float) -> None:
        super().__init__()
        if patch_size != 4:
            raise ValueError(f"the conv stem downsamples by 4 (two stride-2 convolutions), got patch_size {patch_size}")
        self.patch_size = patch_size
        mid = max(embed_dim // 2, 1)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, mid, 3, 2, 1), nn.GroupNorm(1, mid), nn.GELU(),
            nn.Conv2d(mid, embed_dim, 3, 2, 1), nn.GroupNorm(1, embed_dim), nn.GELU(),
            nn.Conv2d(embed_dim, embed_dim, 1),
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.stem(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class SwinBlock(nn.Module):
    """Pre-norm Swin block: x + DropPath(W-MSA/SW-MSA(LN(x))); x + DropPath(MLP(LN(x)))."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float, drop_path: float,
        norm_eps: float, backend: str,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size} for window {window_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias=True, backend=backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        y = self.norm1(x).view(b, hw[0], hw[1], c)
        # pad (qkv-bias tokens, unmasked) -> roll -> windows -> attention -> reverse -> unroll -> crop, fused
        y = self.attn.forward_map(y, self.shift_size, roll_before_pad=False).reshape(b, n, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}"


class PatchMerging(nn.Module):
    """Pad to even, concat the 2x2 sub-grids (even,even), (odd,even), (even,odd), (odd,odd) [row, col],
    LayerNorm(4C), Linear 4C -> 2C without bias."""

    def __init__(self, dim: int, norm_eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        b, _, c = x.shape
        h, w = hw
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        hw = (x.shape[1], x.shape[2])
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c))), hw


class SwinStage(nn.Module):
    """The blocks of one stage (alternating shift 0 / shift) and the patch merging that ends it."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, window: int, shift: int, mlp_ratio: float,
        drop_path: list[float], norm_eps: float, backend: str, downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else shift, mlp_ratio, drop_path[i], norm_eps, backend)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, norm_eps) if downsample else None


class SwinTransformer(nn.Module):
    """Swin backbone returning ``(view_feature (B, C), region_tokens (B, L, C))``.

    Args:
        img_size: the global crop size; fixes every stage's window and shift (see the module docstring).
        window_size: W (7 or 14 in the paper).
        drop_path_rate: final stochastic-depth rate (linear over all blocks; 0 for the teacher).
        norm_eps: LayerNorm eps (1e-6 as official EsViT; timm's Swin uses 1e-5).
        backend: window-attention backend of :mod:`esvit_kernels` ("auto" | "triton" | "cuda" | "torch").
        use_checkpoint: recompute each block in the backward pass (activation checkpointing).
        stem: "patch" (the paper's patch x patch convolution) or "conv" (:class:`ConvStem`, patch 4 only).
    """

    def __init__(
        self, *, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24), window_size: int = 7,
        mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, norm_eps: float = 1e-6, backend: str = "auto",
        use_checkpoint: bool = False, stem: str = "patch",
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} must have one entry per stage")
        if img_size < patch_size:
            raise ValueError(f"img_size {img_size} is smaller than one patch ({patch_size} px)")
        self.img_size, self.patch_size, self.window_size = img_size, patch_size, window_size
        self.depths = tuple(depths)
        self.use_checkpoint = use_checkpoint
        self.num_features = int(embed_dim * 2 ** (len(depths) - 1))
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        self.patch_embed = (PatchEmbed if stem == "patch" else ConvStem)(patch_size, in_chans, embed_dim, norm_eps)
        dpr = drop_path_schedule(drop_path_rate, sum(depths))
        res = img_size // patch_size
        self.stage_windows: list[tuple[int, int]] = []
        layers = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            window, shift = stage_window(max(res // 2**i, 1), window_size)
            self.stage_windows.append((window, shift))
            start = sum(depths[:i])
            layers.append(SwinStage(
                int(embed_dim * 2**i), depth, heads, window, shift, mlp_ratio, dpr[start:start + depth], norm_eps,
                backend, downsample=i < len(depths) - 1,
            ))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps)
        self.apply(init_transformer_weights)
        for m in self.modules():  # the bias tables (trunc-normal 0.02, like the Linear weights)
            if isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def _run_block(self, blk: SwinBlock, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled() and self.training:
            return checkpoint(blk, x, hw, use_reentrant=False)
        return blk(x, hw)

    def _blocks(self, x: torch.Tensor):
        """Yield (stage index, block output, (H, W)) for every block, in order; the last item is the final map."""
        x, hw = self.patch_embed(x)
        for i, stage in enumerate(self.layers):
            for blk in stage.blocks:
                x = self._run_block(blk, x, hw)
                yield i, x, hw
            if stage.downsample is not None:
                x, hw = stage.downsample(x, hw)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Final-LayerNorm tokens (B, L, C) and their grid (H, W) (row-major tokens)."""
        (_, x, hw), = deque(self._blocks(x), maxlen=1)
        return self.norm(x), hw

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) -> (view feature = mean of the region tokens (B, C), region tokens (B, L, C))."""
        regions, _ = self.forward_features(x)
        return regions.mean(dim=1), regions

    def forward_return_n_last_blocks(self, x: torch.Tensor, n: int = 4) -> torch.Tensor:
        """Concat of the mean-pooled tokens of the last ``n`` blocks (official Swin eval: blocks of the last
        stage get the final norm). 2304-d for Swin-T/S with n=4."""
        if not 1 <= n <= sum(self.depths):
            raise ValueError(f"n must be in [1, {sum(self.depths)}], got {n}")
        last = len(self.layers) - 1
        outs = list(self._blocks(x))[-n:]
        return torch.cat([(self.norm(t) if i == last else t).mean(dim=1) for i, t, _ in outs], dim=-1)
