"""Window-attention suite: Swin and ViL stage shapes, the input factories, minimum bytes, and the run plan.

Three scopes per Swin (shape, dtype), each with its own providers (:mod:`benchmarks.attention_providers`):

* ``block`` -- the (B, H, W, 3C) qkv map in, the (B, H, W, C) map out: pad, roll, partition, attention
  with bias and shift mask, reverse, roll back, crop. What the fused kernel absorbs is inside the timed
  region of every provider.
* ``core`` -- q, k, v already in windows (B*nW, heads, N, head_dim), bias table (+ a precomputed shift
  mask): the attention core alone.
* ``layer`` -- x (B, H, W, C) in: qkv Linear, attention, proj (timm's ``SwinTransformerBlock._attn``
  against the same block patched onto our kernels).

Shapes follow the Swin models built for 224 px input: stage i has resolution 56 / 2^i, C = embed * 2^i;
a stage whose 224-px resolution is <= W uses window = resolution and no shift, otherwise W and shift
W // 2. The 96-px local crops run through the same (224-built) blocks, so they are padded to the window
(e.g. a 3x3 map in a 7x7 window) exactly as the official code does; their batch is 8 crops per image.

A fourth scope, ``vil``, times Vision Longformer's local-query attention (``neighborhood_window_attention``):
q, k, v (B, H, W, C) maps, one global token's key / value, the ((4w-1)^2, heads) table and the global bias in,
the (B, H, W, C) map out, at the sparse stages of ViL-2262 (stages 1 and 2; stages 3 and 4 run full
attention in the official arch string), full 3x3 neighbourhood (eval MODE 0, the most work; training's
MODE 1 attends to 2 of the 9 windows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from esvit_kernels import reference

from .harness import Record
from .suite import DTYPES, Case, RunContext, run_cases

SWIN = {"SwinT/S": (96, (3, 6, 12, 24)), "SwinB": (128, (4, 8, 16, 32))}  # Swin-T and -S share stage shapes
LOCAL_CROPS = 8
SCOPES = ("block", "core", "layer")
VIL_2262 = ((96, 3), (192, 6))  # (C, heads) of the sparse stages (window 7, one global token)


@dataclass(frozen=True)
class _Layer:
    """What the Swin and ViL layer shapes share: the layer's fields, head_dim and the local-crop tag of their
    names."""

    model: str
    stage: int
    img: int
    batch: int
    res: int
    dim: int
    heads: int
    window: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def crops(self) -> str:
        return f"({LOCAL_CROPS}x{self.batch // LOCAL_CROPS})" if self.img == 96 else ""


@dataclass(frozen=True)
class AttnShape(_Layer):
    """One window-attention layer: batch, map resolution, channels, heads, window and shift."""

    shift: int
    base_window: int

    @property
    def padded(self) -> int:
        return -(-self.res // self.window) * self.window

    @property
    def n_windows(self) -> int:
        return (self.padded // self.window) ** 2

    @property
    def tokens(self) -> int:
        return self.window * self.window

    @property
    def name(self) -> str:
        return (f"{self.model}-s{self.stage}-{self.img}px-W{self.base_window}-B{self.batch}{self.crops}"
                f" ({self.res}x{self.res} w{self.window} s{self.shift} C{self.dim} h{self.heads})")

    @property
    def physical(self) -> tuple[int, ...]:
        """What determines the work: equal tuples are the same benchmark under two names."""
        return (self.batch, self.res, self.dim, self.heads, self.window, self.shift)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "padded": self.padded, "n_windows": self.n_windows, "tokens": self.tokens,
                "head_dim": self.head_dim}


def swin_stages(model: str, base_window: int, img: int, images: int) -> list[AttnShape]:
    """The four stage shapes of a Swin model built for 224 px, fed ``images`` images of ``img`` px."""
    embed, heads = SWIN[model]
    batch = images if img == 224 else images * LOCAL_CROPS
    out = []
    for i in range(4):
        res224 = 56 >> i
        window, shift = (res224, 0) if res224 <= base_window else (base_window, base_window // 2)
        out.append(AttnShape(model, i + 1, img, batch, (img // 4) >> i, embed << i, heads[i], window, shift,
                             base_window))
    return out


def cpu_shapes() -> list[AttnShape]:
    """One tiny shape for the CPU smoke pass (the Triton interpreter is slow): a 10x10 map padded to 2x2
    windows of 7, shifted by 3, one head, so padding, shift and mask are all exercised."""
    return [AttnShape("tiny", 1, 40, 1, 10, 32, 1, 7, 3, 7)]


def plan(device: torch.device, quick: bool) -> list[tuple[AttnShape | ViLShape, str]]:
    """(shape, dtype) pairs in priority order (a time budget cuts from the end), duplicates removed."""
    if device.type != "cuda":
        return [(s, "fp32") for s in cpu_shapes() + vil_cpu_shapes()]
    if quick:
        return [(s, "bf16") for s in swin_stages("SwinT/S", 7, 224, 32) if s.stage in (1, 3)] + [
            (vil_stages(224, 32)[0], "bf16")]
    tiers: list[tuple[list[AttnShape | ViLShape], tuple[str, ...]]] = [
        (swin_stages("SwinT/S", 7, 224, 128), ("bf16",)),
        (vil_stages(224, 128), ("bf16",)),
        (swin_stages("SwinT/S", 7, 224, 32), ("bf16",)),
        (swin_stages("SwinT/S", 7, 96, 32) + vil_stages(96, 32), ("bf16",)),
        (swin_stages("SwinB", 7, 224, 128), ("bf16",)),
        (swin_stages("SwinT/S", 14, 224, 128) + swin_stages("SwinB", 14, 224, 128), ("bf16",)),
        (swin_stages("SwinT/S", 7, 224, 128) + vil_stages(224, 128), ("fp16", "fp32")),
    ]
    rest = [s for m in SWIN for w in (7, 14) for img in (224, 96) for n in (32, 128) for s in swin_stages(m, w, img, n)]
    tiers.append((rest, ("bf16", "fp16", "fp32")))
    seen: set[tuple[Any, ...]] = set()
    out = []
    for shapes, dtypes in tiers:
        for dt in dtypes:
            for s in shapes:
                if (s.physical, dt) not in seen:
                    seen.add((s.physical, dt))
                    out.append((s, dt))
    return out


@dataclass(frozen=True)
class ViLShape(_Layer):
    """One ViL local-query attention layer: batch, map resolution, channels, heads, window, global tokens."""

    nglo: int

    @property
    def grid(self) -> int:
        """Windows per side of the padded map."""
        return -(-self.res // self.window)

    @property
    def name(self) -> str:
        return (f"{self.model}-s{self.stage}-{self.img}px-B{self.batch}{self.crops}"
                f" ({self.res}x{self.res} w{self.window} C{self.dim} h{self.heads} g{self.nglo})")

    @property
    def physical(self) -> tuple[int, ...]:
        return ("vil", self.batch, self.res, self.dim, self.heads, self.window, self.nglo)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "grid": self.grid, "head_dim": self.head_dim}


def vil_stages(img: int, images: int) -> list[ViLShape]:
    """The sparse-attention stages (1, 2) of ViL-2262 (built for 224 px, window 7, one global token), fed
    ``images`` images of ``img`` px (96-px local crops: 8 per image)."""
    batch = images if img == 224 else images * LOCAL_CROPS
    return [ViLShape("ViL-2262", i + 1, img, batch, (img // 4) >> i, dim, heads, 7, 1)
            for i, (dim, heads) in enumerate(VIL_2262)]


def vil_cpu_shapes() -> list[ViLShape]:
    """The CPU smoke pass's ViL shape: a 10x10 map padded to 2x2 windows of 7, one head, one global token."""
    return [ViLShape("tiny-vil", 1, 40, 1, 10, 32, 1, 7, 1)]


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class AttnInputs:
    """Tensors shared by every provider of one case (which of them exist depends on the scope)."""

    shape: AttnShape
    dtype: torch.dtype
    device: torch.device
    table: torch.Tensor  # ((2W-1)^2, heads), fp32 like a module parameter under autocast
    qkv: torch.Tensor | None = None  # block: (B, H, W, 3C)
    q: torch.Tensor | None = None  # core: (B*nW, heads, N, hd) each
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # core: (nW, N, N) float shift mask, None without shift
    labels: torch.Tensor | None = None  # core: (nW, N) shift-region label of every window token
    x: torch.Tensor | None = None  # layer: (B, H, W, C)
    block: torch.nn.Module | None = None  # layer: timm SwinTransformerBlock in ``dtype``

    @property
    def scale(self) -> float:
        return self.shape.head_dim**-0.5

    @property
    def ws(self) -> tuple[int, int]:
        return (self.shape.window, self.shape.window)

    @property
    def ss(self) -> tuple[int, int]:
        return (self.shape.shift, self.shape.shift)

    def grads(self) -> list[torch.Tensor]:
        """The leaf tensors that receive gradients in this scope."""
        return [t for t in (self.qkv, self.q, self.k, self.v, self.x, self.table) if t is not None]


def make_inputs(shape: AttnShape, dtype: str, scope: str, device: torch.device) -> AttnInputs:
    """Random inputs for ``scope`` (seeded; values are irrelevant to timing but kept realistic)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = DTYPES[dtype]

    def leaf(*size: int, dtype: torch.dtype = dt, std: float = 1.0) -> torch.Tensor:
        t = torch.randn(*size, generator=g) * std
        return t.to(device=device, dtype=dtype).requires_grad_(True)

    s = shape
    ins = AttnInputs(s, dt, device, table=leaf((2 * s.window - 1) ** 2, s.heads, dtype=torch.float32, std=0.02))
    if scope == "block":
        ins.qkv = leaf(s.batch, s.res, s.res, 3 * s.dim)
    elif scope == "core":
        bw = s.batch * s.n_windows
        ins.q, ins.k, ins.v = (leaf(bw, s.heads, s.tokens, s.head_dim) for _ in range(3))
        if s.shift:
            hw = (s.padded, s.padded)
            ins.mask = reference.shift_mask(hw, ins.ws, ins.ss, device)
            labels = reference.shift_region_labels(hw, ins.ws, ins.ss, device)
            ins.labels = reference.window_partition(labels[None, :, :, None], ins.ws)[..., 0].contiguous()
    elif scope == "layer":
        from timm.models.swin_transformer import SwinTransformerBlock

        ins.x = leaf(s.batch, s.res, s.res, s.dim)
        ins.block = SwinTransformerBlock(s.dim, (s.res, s.res), num_heads=s.heads, window_size=s.window,
                                         shift_size=s.shift, always_partition=True).to(device=device, dtype=dt)
        ins.table = ins.block.attn.relative_position_bias_table
    else:
        raise ValueError(f"unknown scope {scope!r}")
    return ins


@dataclass
class ViLInputs:
    """Tensors of one ViL case: the local q / k / v maps, the global token's key / value, the biases."""

    shape: ViLShape
    dtype: torch.dtype
    device: torch.device
    q: torch.Tensor  # (B, H, W, C) each
    k: torch.Tensor
    v: torch.Tensor
    global_k: torch.Tensor  # (B, G, C) each
    global_v: torch.Tensor
    table: torch.Tensor  # ((4w-1)^2, heads) fp32
    global_bias: torch.Tensor  # (heads, G) fp32

    @property
    def scale(self) -> float:
        return self.shape.head_dim**-0.5

    def grads(self) -> list[torch.Tensor]:
        return [self.q, self.k, self.v, self.global_k, self.global_v, self.table, self.global_bias]


def make_vil_inputs(shape: ViLShape, dtype: str, device: torch.device) -> ViLInputs:
    """Random inputs of one ViL case (seeded)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = DTYPES[dtype]

    def leaf(*size: int, dtype: torch.dtype = dt, std: float = 1.0) -> torch.Tensor:
        t = torch.randn(*size, generator=g) * std
        return t.to(device=device, dtype=dtype).requires_grad_(True)

    s = shape
    maps = [leaf(s.batch, s.res, s.res, s.dim) for _ in range(3)]
    glob = [leaf(s.batch, s.nglo, s.dim) for _ in range(2)]
    return ViLInputs(s, dt, device, *maps, *glob, table=leaf((4 * s.window - 1) ** 2, s.heads, dtype=torch.float32,
                                                            std=0.02),
                     global_bias=leaf(s.heads, s.nglo, dtype=torch.float32, std=0.02))


# ------------------------------------------------------------------------------------------------ bytes


def bytes_min(shape: AttnShape, dtype: str, scope: str, mode: str) -> int | None:
    """Minimum HBM traffic of the op (what an ideal kernel must read and write once).

    fwd: read qkv, write out and the fp32 log-sum-exp (+ bias table, + the mask the core takes as input);
    bwd: read qkv, out, dout, lse (+ table, mask), write dqkv and dtable; fwd+bwd: the sum. The block
    counts the H*W real tokens (padding is index arithmetic), the core the padded windows it is given.
    """
    if scope == "layer":
        return None
    elt = torch.empty((), dtype=DTYPES[dtype]).element_size()
    s = shape
    tokens = s.batch * (s.res * s.res if scope == "block" else s.n_windows * s.tokens)
    lse = s.batch * s.n_windows * s.heads * s.tokens * 4
    table = (2 * s.window - 1) ** 2 * s.heads * 4
    mask = s.n_windows * s.tokens * s.tokens * 4 if scope == "core" and s.shift else 0
    qkv, out = tokens * 3 * s.dim * elt, tokens * s.dim * elt
    fwd = qkv + out + lse + table + mask
    bwd = qkv + 2 * out + lse + table + mask + qkv + table
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def vil_bytes_min(shape: ViLShape, dtype: str, mode: str) -> int:
    """Minimum HBM traffic of the ViL op: fwd reads q, k, v, the global k / v and the tables, writes out and
    the fp32 log-sum-exp; bwd reads q, k, v, out, dout, lse, the globals and tables, writes dq, dk, dv and
    the global and table gradients."""
    elt = torch.empty((), dtype=DTYPES[dtype]).element_size()
    s = shape
    tok = s.batch * s.res * s.res * s.dim * elt
    glob = 2 * s.batch * s.nglo * s.dim * elt
    tables = ((4 * s.window - 1) ** 2 * s.heads + s.heads * s.nglo) * 4
    lse = s.batch * s.grid**2 * s.heads * s.window**2 * 4
    fwd = 3 * tok + glob + tables + tok + lse
    bwd = 3 * tok + 2 * tok + lse + glob + tables + 3 * tok + glob + tables
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# ------------------------------------------------------------------------------------------------ cases


def headline_shapes(device: torch.device) -> list[AttnShape]:
    """gpu-check's headline: Swin-T stage 1 (B=128, 56x56, C=96, 3 heads, W7), Swin-T stage 3 (14x14,
    C=384, 12 heads, W7) and Swin-B stage 1 at W14 (56x56, C=128, 4 heads), all at batch 128; the CPU
    smoke pass's one tiny shape on the CPU."""
    if device.type != "cuda":
        return cpu_shapes()
    t7, b14 = swin_stages("SwinT/S", 7, 224, 128), swin_stages("SwinB", 14, 224, 128)
    return [t7[0], t7[2], b14[0]]


def vil_headline_shape(device: torch.device) -> ViLShape:
    """gpu-check's ViL headline: ViL-2262 stage 1 (B=128, 56x56, C=96, 3 heads, w7, one global token); the
    CPU smoke pass's tiny ViL shape on the CPU."""
    return vil_stages(224, 128)[0] if device.type == "cuda" else vil_cpu_shapes()[0]


def block_case(ctx: RunContext, shape: AttnShape, dtype: str, scope: str = "block") -> Case:
    """One attention case (every provider of ``scope``, all three modes)."""
    from .attention_providers import PROVIDERS

    return Case(
        suite="attention", scope=scope, shape_name=shape.name, shape=shape.as_dict(), dtype=dtype,
        modes=("fwd", "bwd", "fwd+bwd"),
        make_inputs=lambda: make_inputs(shape, dtype, scope, ctx.device),
        providers=ctx.select(PROVIDERS[scope]),
        bytes_min=lambda mode: bytes_min(shape, dtype, scope, mode),
    )


def vil_case(ctx: RunContext, shape: ViLShape, dtype: str) -> Case:
    """One ViL case (every provider of the ``vil`` scope, all three modes)."""
    from .attention_providers import PROVIDERS

    return Case(
        suite="attention", scope="vil", shape_name=shape.name, shape=shape.as_dict(), dtype=dtype,
        modes=("fwd", "bwd", "fwd+bwd"),
        make_inputs=lambda: make_vil_inputs(shape, dtype, ctx.device),
        providers=ctx.select(PROVIDERS["vil"]),
        bytes_min=lambda mode: vil_bytes_min(shape, dtype, mode),
    )


def cases(ctx: RunContext) -> Iterator[Case]:
    """Every case of the suite in priority order, after the --only / --dtypes filters."""
    for shape, dtype in plan(ctx.device, ctx.quick):
        if not ctx.wants(shape.name, dtype):
            continue
        if isinstance(shape, ViLShape):
            yield vil_case(ctx, shape, dtype)
            continue
        for scope in SCOPES:
            yield block_case(ctx, shape, dtype, scope)


def run(ctx: RunContext) -> Iterator[list[Record]]:
    """Run the suite case by case (the caller writes results as they come)."""
    return run_cases(cases(ctx), ctx)
