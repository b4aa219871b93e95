"""Vision Longformer (ViL, the official ``MsViT``) backbone as EsViT runs it, on the fused neighbourhood attention.

Follows the official ``models/vision_longformer.py`` / ``layers/longformer2d.py`` of microsoft/esvit (our own
code). An architecture is the official string ``l1,h3,d96,n2,s1,g1,p4,f7,a0_l2,...``: one ``_``-separated item
per stage with l = stage number, h = heads, d = width, n = blocks, s = sparse (1: neighbourhood attention, 0: full
attention), g = global tokens, p = patch (stride) of the stage's embedding, f = window, a = absolute position
embedding (1) or relative-position biases (0); missing fields take the official defaults.

Each stage: a p x p stride-p convolution (+ LayerNorm) over the previous stage's local-token map, its own
``g`` global tokens prepended, then ``n`` pairs of pre-norm blocks ``x + DropPath(Attn(LN(x)))``,
``x + DropPath(MLP(LN(x)))``. Global tokens are dropped at the end of each stage. Sparse stages run
:func:`esvit_kernels.functional.neighborhood_window_attention` (a query in window (m, n) attends to the global
tokens and to its 3x3 neighbourhood of windows, missing neighbours and padding masked) and
:func:`~esvit_kernels.functional.global_token_attention` (global tokens attend to every token); ``mode`` 1
(Table 8's vil_2262) replaces the neighbourhood by the own window plus *one* neighbour drawn per layer call in
training (``torch.randint``, so ``torch.manual_seed`` reproduces it; the official code draws from ``random``),
the full neighbourhood in eval. The final LayerNorm runs over all tokens; the view feature is the first global
token when the last stage has global tokens, else the mean of the tokens; the region tokens are the last
stage's local tokens.

Crops smaller than ``img_size`` (local views) run as official: the relative-position bias matrix of a
full-attention stage and the absolute position embedding are resampled bicubically with the official scale
factors (for the embedding the factor counts the global tokens, so it is resampled by sqrt((N+g)/N) even at
``img_size``). Parameter names are the official ones: an official ``MsViT`` state dict loads once its
``relative_position_index`` buffers (derived, not stored here) are dropped.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from esvit_kernels import functional as KF

from .layers import DropPath, Mlp, drop_path_schedule, init_transformer_weights

__all__ = ["VIL_ARCHS", "ViLArch", "ViLStageSpec", "VisionLongformer", "parse_vil_arch"]


@dataclass(frozen=True)
class ViLStageSpec:
    """One stage of an arch string (official letters in brackets)."""

    num_heads: int  # h
    dim: int  # d
    depth: int  # n
    sparse: bool  # s: neighbourhood attention (True) or full attention (False)
    num_global: int  # g
    patch_size: int  # p
    window_size: int  # f
    ape: bool  # a: absolute position embedding (True) or relative-position biases (False)


_DEFAULTS = {"l": 1, "h": 3, "d": 192, "n": 1, "s": 1, "g": 1, "p": 2, "f": 7, "a": 1, "r": 0}  # official


def parse_vil_arch(arch: str) -> tuple[ViLStageSpec, ...]:
    """Parse an official MsViT arch string (3 or 4 stages) into stage specs; bad strings raise ValueError."""
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"a ViL arch string must be a non-empty str, got {arch!r}")
    stages = []
    for i, item in enumerate(arch.split("_")):
        cfg = dict(_DEFAULTS)
        for field in item.split(","):
            key, val = field[:1], field[1:]
            if key not in _DEFAULTS or not val.isdigit():
                raise ValueError(f"bad field {field!r} in stage {i + 1} of ViL arch {arch!r}: expected a letter of "
                                 f"{''.join(_DEFAULTS)} followed by a non-negative integer")
            cfg[key] = int(val)
        if cfg["l"] != i + 1:
            raise ValueError(f"stage {i + 1} of ViL arch {arch!r} says l{cfg['l']}; stages must be numbered 1, 2, ...")
        if cfg["r"]:
            raise ValueError(f"stage {i + 1} of ViL arch {arch!r}: pooled keys (r) are not supported")
        for key in "hdnpf":
            if cfg[key] < 1:
                raise ValueError(f"stage {i + 1} of ViL arch {arch!r}: {key} must be >= 1, got {cfg[key]}")
        if cfg["d"] % cfg["h"]:
            raise ValueError(f"stage {i + 1} of ViL arch {arch!r}: width d{cfg['d']} is not a multiple of h{cfg['h']}")
        if cfg["a"] and cfg["d"] % 2:
            raise ValueError(f"stage {i + 1} of ViL arch {arch!r}: the absolute position embedding needs an even width")
        if cfg["s"] not in (0, 1) or cfg["a"] not in (0, 1):
            raise ValueError(f"stage {i + 1} of ViL arch {arch!r}: s and a must be 0 or 1")
        stages.append(ViLStageSpec(cfg["h"], cfg["d"], cfg["n"], bool(cfg["s"]), cfg["g"], cfg["p"], cfg["f"],
                                   bool(cfg["a"])))
    if len(stages) not in (3, 4):
        raise ValueError(f"ViL arch {arch!r} has {len(stages)} stages; the official MsViT has 3 or 4")
    return tuple(stages)


@dataclass(frozen=True)
class ViLArch:
    """A ViL preset: the official arch string, the attention mode and the default stochastic depth."""

    arch: str
    mode: int
    drop_path_rate: float


VIL_ARCHS: dict[str, ViLArch] = {
    # tiny preset for the CPU demo and the tests: 3 stages, window 4; at 64 px the maps are 16 (4x4 windows),
    # 8 (2x2 windows) and 4 (full attention); 0.57M parameters; 32-px local crops
    "vil_micro": ViLArch("l1,h1,d32,n2,s1,g1,p4,f4,a0_l2,h2,d64,n2,s1,g1,p2,f4,a0_"
                         "l3,h4,d128,n2,s0,g0,p2,f4,a0", 1, 0.1),
    # Table 8's ViL: the official README's vil_2262 (Swin-T's depths, widths and heads; 27.6M), MODE 1
    "vil_2262": ViLArch("l1,h3,d96,n2,s1,g1,p4,f7,a0_l2,h6,d192,n2,s1,g1,p2,f7,a0_"
                        "l3,h12,d384,n6,s0,g1,p2,f7,a0_l4,h24,d768,n2,s0,g0,p2,f7,a0", 1, 0.1),
    # experiments/imagenet/vil/vil_small/base.yaml: 1-2-8-1, absolute position embeddings (a1 by default); 23.9M
    "vil_small": ViLArch("l1,h3,d96,n1,s1,g1,p4,f7_l2,h3,d192,n2,s1,g1,p2,f7_"
                         "l3,h6,d384,n8,s0,g1,p2,f7_l4,h12,d768,n1,s0,g0,p2,f7", 0, 0.1),
}


def _resample(t: torch.Tensor, scale: float, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a (1, C, h, w) map by the official ``scale_factor``; if the floor of
    ``h * scale`` misses ``size`` (where the official code would fail), resample to ``size`` instead."""
    out = F.interpolate(t, scale_factor=scale, mode="bicubic")
    if tuple(out.shape[-2:]) != size:
        out = F.interpolate(t, size=size, mode="bicubic")
    return out


class PatchEmbed(nn.Module):
    """p x p stride-p convolution, LayerNorm (``norm_embed``), the stage's global tokens prepended, and the
    absolute position embedding (row half + column half of the channels) when ``ape``."""

    def __init__(self, patch_size: int, grid: tuple[int, int], in_chans: int, dim: int, num_global: int, ape: bool,
                 norm_embed: bool, norm_eps: float) -> None:
        super().__init__()
        self.patch_size, self.grid, self.num_global = patch_size, grid, num_global
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm_embed = nn.LayerNorm(dim, eps=norm_eps) if norm_embed else None
        self.cls_token = nn.Parameter(torch.zeros(1, num_global, dim)) if num_global else None
        self.ape = ape
        if ape:
            self.cls_pos_embed = nn.Parameter(torch.zeros(1, num_global, dim))
            self.x_pos_embed = nn.Parameter(torch.zeros(1, grid[0], dim // 2))
            self.y_pos_embed = nn.Parameter(torch.zeros(1, grid[1], dim // 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """x (B, C_in, H, W) -> tokens (B, g + h*w, dim) (globals first, then row-major locals), (h, w)."""
        if min(x.shape[-2:]) < self.patch_size:
            raise ValueError(f"a {tuple(x.shape[-2:])} input is smaller than one {self.patch_size}-px patch")
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if self.norm_embed is not None:
            x = self.norm_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.ape:
            x = x + torch.cat([self.cls_pos_embed, self._pos_embed(hw, x.shape[1])], dim=1)
        return x, hw

    def _pos_embed(self, hw: tuple[int, int], ntokens: int) -> torch.Tensor:
        nx, ny = self.grid
        pos = torch.cat([self.x_pos_embed[:, :, None].expand(-1, -1, ny, -1),
                         self.y_pos_embed[:, None].expand(-1, nx, -1, -1)], dim=-1)  # (1, nx, ny, dim)
        if ntokens == nx * ny and hw == (nx, ny):  # official: the token count includes the global tokens
            return pos.flatten(1, 2)
        if hw[0] != hw[1] or nx != ny:
            raise ValueError(f"the absolute position embedding of a {nx}x{ny} grid is resampled to square maps "
                             f"only (as official), got a {hw[0]}x{hw[1]} map")
        out = _resample(pos.permute(0, 3, 1, 2), math.sqrt(ntokens / (nx * ny)), hw)
        return out.permute(0, 2, 3, 1).flatten(1, 2)


class _GlobalBias(nn.Module):
    """Holder of the global-token biases (official names): ``g2l_relative_position_bias`` (2, heads, g)
    ([0]: global -> local, [1]: local -> global) and ``g2g_relative_position_bias`` (heads, g, g)."""

    def _init_global_bias(self, num_heads: int, num_global: int) -> None:
        self.g2l_relative_position_bias = nn.Parameter(torch.zeros(2, num_heads, num_global))
        self.g2g_relative_position_bias = nn.Parameter(torch.zeros(num_heads, num_global, num_global))

    def _global_rows(self, nloc: int) -> torch.Tensor:
        """(heads, g, g + nloc) bias of the global queries: g2g, then g2l[0] broadcast over the local keys."""
        g2l = self.g2l_relative_position_bias[0]
        return torch.cat([self.g2g_relative_position_bias, g2l[:, :, None].expand(-1, -1, nloc)], dim=-1)


class LongformerAttention(_GlobalBias):
    """ViL's sparse attention (official ``Long2DSCSelfAttention``): local queries (``query``, keys/values from
    ``kv``) over the global tokens and their 3x3 window neighbourhood; global queries (``query_global``,
    ``kv_global``, ``proj_global``; the local ones when ``share_w``) over every token.

    Args:
        mode: 0 = full 3x3 neighbourhood; 1 = own window + one neighbour drawn per call in training (full in
            eval); -1 = own window only.
        backend: the op's backend ("auto" | "triton" | "torch"); :func:`esvit.models.set_backend` switches it.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, num_global: int, rpe: bool, share_w: bool = True,
                 qkv_bias: bool = True, mode: int = 0, backend: str = "auto") -> None:
        super().__init__()
        if mode not in (-1, 0, 1):
            raise ValueError(f"ViL mode must be -1 (own window), 0 (full) or 1 (random neighbour), got {mode}")
        self.num_heads, self.window_size, self.num_global = num_heads, window_size, num_global
        self.mode, self.backend, self.rpe = mode, backend, rpe
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if num_global:
            if share_w:
                self.query_global, self.kv_global, self.proj_global = self.query, self.kv, self.proj
            else:
                self.query_global = nn.Linear(dim, dim, bias=qkv_bias)
                self.kv_global = nn.Linear(dim, 2 * dim, bias=qkv_bias)
                self.proj_global = nn.Linear(dim, dim)
        if rpe:
            self.local_relative_position_bias_table = nn.Parameter(torch.zeros((4 * window_size - 1) ** 2, num_heads))
            if num_global:
                self._init_global_bias(num_heads, num_global)

    def neighbor(self) -> int:
        """The op's ``neighbor`` for this call: 0 (full), -1 (own only) or a draw in 1..8 (mode 1, training)."""
        if self.mode == 1:
            return int(torch.randint(1, 9, ())) if self.training else 0
        return self.mode

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x (B, g + h*w, C) -> (B, g + h*w, C), globals first."""
        b, n, c = x.shape
        g, (h, w) = self.num_global, hw
        if n != g + h * w:
            raise ValueError(f"expected {g} global + {h}x{w} local tokens, got {n}")
        k, v = self.kv(x).split(c, dim=-1)
        q = self.query(x[:, g:]).reshape(b, h, w, c)
        local = KF.neighborhood_window_attention(
            q, k[:, g:].reshape(b, h, w, c), v[:, g:].reshape(b, h, w, c), self.num_heads, self.window_size,
            global_k=k[:, :g] if g else None, global_v=v[:, :g] if g else None,
            local_bias_table=self.local_relative_position_bias_table if self.rpe else None,
            global_bias=self.g2l_relative_position_bias[1] if self.rpe and g else None,
            neighbor=self.neighbor(), backend=self.backend,
        )
        local = self.proj(local.reshape(b, h * w, c))
        if not g:
            return local
        if self.kv_global is not self.kv:
            k, v = self.kv_global(x).split(c, dim=-1)
        glob = KF.global_token_attention(self.query_global(x[:, :g]), k, v, self.num_heads,
                                         bias=self._global_rows(h * w) if self.rpe else None)
        return torch.cat([self.proj_global(glob), local], dim=1)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, window_size={self.window_size}, num_global={self.num_global}, "
                f"mode={self.mode}, backend={self.backend!r}")


class FullAttention(_GlobalBias):
    """Full multi-head attention of a stage whose arch says s0 (official ``Attention``): one ``qkv`` Linear;
    with relative positions, a ((2nx-1)(2ny-1), heads) table over the ``img_size`` grid plus the global biases.
    Other crop sizes resample the (N, N, heads) bias matrix bicubically as official."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], num_global: int, rpe: bool,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.num_global, self.grid, self.rpe = num_heads, num_global, grid, rpe
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if rpe:
            nx, ny = grid
            self.local_relative_position_bias_table = nn.Parameter(torch.zeros((2 * nx - 1) * (2 * ny - 1), num_heads))
            if num_global:
                self._init_global_bias(num_heads, num_global)
            coords = torch.stack(torch.meshgrid(torch.arange(nx), torch.arange(ny), indexing="ij")).flatten(1)
            rel = coords[:, :, None] - coords[:, None, :]
            index = (rel[0] + nx - 1) * (2 * ny - 1) + rel[1] + ny - 1
            self.register_buffer("relative_position_index", index, persistent=False)

    def attention_bias(self, nloc: int) -> torch.Tensor:
        """(heads, g + nloc, g + nloc) additive bias."""
        n0 = self.grid[0] * self.grid[1]
        table = self.local_relative_position_bias_table
        local = table[self.relative_position_index.view(-1)].view(n0, n0, -1).permute(2, 0, 1)  # (heads, n0, n0)
        if nloc != n0:
            local = _resample(local[None], nloc / n0, (nloc, nloc))[0]
        if not self.num_global:
            return local
        g2l = self.g2l_relative_position_bias[1]
        local_rows = torch.cat([g2l[:, None].expand(-1, nloc, -1), local], dim=-1)
        return torch.cat([self._global_rows(nloc), local_rows], dim=1)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        nloc = hw[0] * hw[1]
        if n != self.num_global + nloc:
            raise ValueError(f"expected {self.num_global} global + {hw[0]}x{hw[1]} local tokens, got {n}")
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.attention_bias(nloc).to(q.dtype) if self.rpe else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, grid={self.grid}, num_global={self.num_global}"


class AttnBlock(nn.Module):
    """x + DropPath(attn(LN(x)))."""

    def __init__(self, dim: int, attn: nn.Module, drop_path: float, norm_eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return x + self.drop_path(self.attn(self.norm(x), hw))


class MlpBlock(nn.Module):
    """x + DropPath(MLP(LN(x))), hidden width 4 x dim."""

    def __init__(self, dim: int, drop_path: float, norm_eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm(x)))


class VisionLongformer(nn.Module):
    """ViL backbone returning ``(view_feature (B, C), region_tokens (B, L, C))``.

    Args:
        arch: official arch string (see the module docstring).
        img_size: the global crop size; fixes the full-attention bias tables and the position-embedding grids.
        mode: -1 | 0 | 1, the sparse attention's neighbourhood (:class:`LongformerAttention`).
        drop_path_rate: final stochastic-depth rate (linear over all blocks; 0 for the teacher).
        share_w: global tokens use the local projections (official SHARE_W, True in the presets).
        norm_embed: LayerNorm after each patch embedding (official NORM_EMBED, True in the presets).
        norm_eps: LayerNorm eps (1e-6 as official).
        backend: the sparse attention's op backend ("auto" | "triton" | "torch").
        use_checkpoint: recompute each block in the backward pass (the MODE-1 draw is replayed).

    Stage ``i`` is ``self.layer{i+1}``, a ModuleList [PatchEmbed, AttnBlock, MlpBlock, AttnBlock, ...] as the
    official ``nn.Sequential``, so official parameter names carry over.
    """

    def __init__(
        self, arch: str, *, img_size: int = 224, in_chans: int = 3, mode: int = 0, drop_path_rate: float = 0.1,
        share_w: bool = True, norm_embed: bool = True, qkv_bias: bool = True, norm_eps: float = 1e-6,
        backend: str = "auto", use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.stages = parse_vil_arch(arch)
        if mode not in (-1, 0, 1):
            raise ValueError(f"ViL mode must be -1 (own window), 0 (full) or 1 (random neighbour), got {mode}")
        self.img_size, self.mode, self.use_checkpoint = img_size, mode, use_checkpoint
        self.depths = tuple(s.depth for s in self.stages)
        self.num_features = self.stages[-1].dim
        self.min_crop_size = math.prod(s.patch_size for s in self.stages)
        if img_size < self.min_crop_size:
            raise ValueError(f"img_size {img_size} is smaller than the {self.min_crop_size} px the {len(self.stages)} "
                             "patch embeddings need")
        dpr = drop_path_schedule(drop_path_rate, sum(self.depths))
        grid, in_dim, start = (img_size, img_size), in_chans, 0
        for i, s in enumerate(self.stages):
            grid = (grid[0] // s.patch_size, grid[1] // s.patch_size)
            layers: list[nn.Module] = [PatchEmbed(s.patch_size, grid, in_dim, s.dim, s.num_global, s.ape, norm_embed,
                                                  norm_eps)]
            for j in range(s.depth):
                if s.sparse:
                    attn = LongformerAttention(s.dim, s.num_heads, s.window_size, s.num_global, not s.ape, share_w,
                                               qkv_bias, mode, backend)
                else:
                    attn = FullAttention(s.dim, s.num_heads, grid, s.num_global, not s.ape, qkv_bias)
                layers += [AttnBlock(s.dim, attn, dpr[start + j], norm_eps), MlpBlock(s.dim, dpr[start + j], norm_eps)]
            setattr(self, f"layer{i + 1}", nn.ModuleList(layers))
            in_dim, start = s.dim, start + s.depth
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        """Official init: trunc-normal(0.02) tables, global tokens and position embeddings; Linear / LayerNorm
        as :func:`init_transformer_weights`; convolutions keep PyTorch's default."""
        for name, p in self.named_parameters():
            if name.rsplit(".", 1)[-1] in ("cls_token", "cls_pos_embed", "x_pos_embed", "y_pos_embed",
                                           "local_relative_position_bias_table", "g2l_relative_position_bias",
                                           "g2g_relative_position_bias"):
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_transformer_weights)

    @property
    def layers(self) -> list[nn.ModuleList]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.stages))]

    def _blocks(self, x: torch.Tensor):
        """Yield (stage index, tokens after the block (B, g + h*w, C), (h, w)) for every block, in order."""
        hw = (x.shape[-2], x.shape[-1])
        for i, (spec, stage) in enumerate(zip(self.stages, self.layers)):
            if i:  # drop the previous stage's global tokens; the local tokens become a (B, C, h, w) map
                g = self.stages[i - 1].num_global
                x = x[:, g:].transpose(1, 2).reshape(x.shape[0], -1, *hw)
            x, hw = stage[0](x)
            for j in range(spec.depth):
                attn, mlp = stage[1 + 2 * j], stage[2 + 2 * j]
                if self.use_checkpoint and torch.is_grad_enabled() and self.training:
                    x = checkpoint(lambda t, a=attn, m=mlp, hw=hw: m(a(t, hw), hw), x, use_reentrant=False)
                else:
                    x = mlp(attn(x, hw), hw)
                yield i, x, hw

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Final-LayerNorm local tokens of the last stage (B, h*w, C) and their grid (h, w) (row-major)."""
        tokens, hw = self._final(x)
        return tokens[:, self.stages[-1].num_global:], hw

    def _final(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_crop_size:
            raise ValueError(f"a {x.shape[-2]}x{x.shape[-1]} crop is smaller than the {self.min_crop_size} px this "
                             "ViL's patch embeddings need")
        (_, tokens, hw), = deque(self._blocks(x), maxlen=1)
        return self.norm(tokens), hw

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) -> (view feature (B, C), region tokens (B, h*w, C)). The view feature is the first
        global token when the last stage has global tokens (official), else the mean of the tokens."""
        tokens, _ = self._final(x)
        g = self.stages[-1].num_global
        view = tokens[:, 0] if g else tokens.mean(dim=1)
        return view, tokens[:, g:]

    def forward_return_n_last_blocks(self, x: torch.Tensor, n: int = 4) -> torch.Tensor:
        """Concat of the last ``n`` blocks' features (official): the first global token of a stage with global
        tokens, else the token mean; blocks of the last stage get the final norm."""
        if not 1 <= n <= sum(self.depths):
            raise ValueError(f"n must be in [1, {sum(self.depths)}], got {n}")
        last = len(self.stages) - 1
        feats = []
        for i, t, _ in list(self._blocks(x))[-n:]:
            t = self.norm(t) if i == last else t
            feats.append(t[:, 0] if self.stages[i].num_global else t.mean(dim=1))
        return torch.cat(feats, dim=-1)
