"""Monolithic ViT baselines of the paper's tables (DINO's ``vision_transformer``): DeiT-S/16 and ViT-B/16.

The CLS token after the final LayerNorm is the view feature and the patch tokens after it are the region
features. Position embeddings are interpolated (bicubic) for crops of another size than ``img_size``,
so the 96-px local crops run through the same model. LayerNorm eps 1e-6, qkv bias, no dropout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import DropPath, Mlp, drop_path_schedule, init_transformer_weights

__all__ = ["VIT_ARCHS", "ViTArch", "VisionTransformer"]


@dataclass(frozen=True)
class ViTArch:
    embed_dim: int
    depth: int
    num_heads: int
    drop_path_rate: float


VIT_ARCHS: dict[str, ViTArch] = {
    "deit_small": ViTArch(384, 12, 6, 0.1),
    "vit_base": ViTArch(768, 12, 12, 0.1),
}


class Attention(nn.Module):
    """Multi-head self-attention (qkv Linear -> SDPA -> proj)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class VisionTransformer(nn.Module):
    """ViT returning ``(CLS token (B, C), patch tokens (B, L, C))``, both after the final LayerNorm."""

    def __init__(
        self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
        depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1,
        norm_eps: float = 1e-6, use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if img_size < patch_size:
            raise ValueError(f"img_size {img_size} is smaller than one patch ({patch_size} px)")
        self.img_size, self.patch_size, self.depth = img_size, patch_size, depth
        self.num_features = embed_dim
        self.use_checkpoint = use_checkpoint
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        dpr = drop_path_schedule(drop_path_rate, depth)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, dpr[i], norm_eps) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_transformer_weights)

    def _pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        n = self.pos_embed.shape[1] - 1
        side = int(math.isqrt(n))
        if hw == (side, side):
            return self.pos_embed
        patch = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=hw, mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], patch.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        x, hw = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self._pos_embed(hw).to(x.dtype)

    def _run(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled() and self.training:
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._tokens(x)
        for blk in self.blocks:
            x = self._run(blk, x)
        x = self.norm(x)
        return x[:, 0], x[:, 1:]

    def forward_return_n_last_blocks(self, x: torch.Tensor, n: int = 4) -> torch.Tensor:
        """Concat of the normed CLS tokens of the last ``n`` blocks (DINO's linear evaluation)."""
        if not 1 <= n <= self.depth:
            raise ValueError(f"n must be in [1, {self.depth}], got {n}")
        x = self._tokens(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = self._run(blk, x)
            if i >= self.depth - n:
                outs.append(self.norm(x)[:, 0])
        return torch.cat(outs, dim=-1)
