"""Window-attention providers: our backends and the peers a user would pick instead.

Peers (DESIGN.md section 4): the eager reference (official Swin style: pad, roll, partition, explicit
gathered bias and mask, reverse), ``torch.compile`` of it, SDPA with bias + mask as a float ``attn_mask``
(EFFICIENT_ATTENTION pinned, which can differentiate the mask, and the default dispatch), FlexAttention
(compiled; ``score_mod`` gathers the bias from the table, the shift mask is a ``mask_mod`` block mask),
and timm's ``SwinTransformerBlock._attn``. The compiled providers come last in each list, so a time
budget cuts them before the others. Ours: ``esvit_kernels`` with ``backend="triton" | "cuda"``
(and ``"torch"``, the reference behind the public API).

Block-level SDPA and FlexAttention do the same eager pad / roll / partition / reverse as the reference
(zero padding) around their core; their shift mask (SDPA) and block mask (Flex) depend only on the shape
and are built once at setup, like timm's ``attn_mask`` buffer, while the bias is gathered in every call
(it is a trained parameter). Flex's mask_mod excludes cross-region pairs (-inf) where the official mask
adds -100: the softmax weights differ by < 1e-43.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

import esvit_kernels as ek
from esvit_kernels import reference

from .attention import AttnInputs
from .suite import Forward, Provider, backend_check

# ------------------------------------------------------------------------------------------------ checks


def _cuda_only(what: str) -> Callable[[AttnInputs, str], str | None]:
    def check(ins: AttnInputs, mode: str) -> str | None:
        return None if ins.device.type == "cuda" else f"{what} is a CUDA kernel; it does not run on {ins.device.type}"

    return check


def _flex_check(ins: AttnInputs, mode: str) -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as exc:
        return f"FlexAttention is not in torch {torch.__version__} ({exc})"
    if ins.device.type != "cuda" and mode != "fwd":
        return f"FlexAttention has no backward on {ins.device.type} in torch {torch.__version__} (NotImplementedError)"
    return None


# ------------------------------------------------------------------------------------------------ shared


def _to_windows(qkv: torch.Tensor, ins: AttnInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official order: zero-pad to the window, roll by -shift, partition, split q/k/v per head."""
    s = ins.shape
    x = qkv
    if s.padded != s.res:
        x = F.pad(x, (0, 0, 0, s.padded - s.res, 0, s.padded - s.res))
    if s.shift:
        x = torch.roll(x, shifts=(-s.shift, -s.shift), dims=(1, 2))
    win = reference.window_partition(x, ins.ws)
    bw, n, _ = win.shape
    return win.view(bw, n, 3, s.heads, s.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def _from_windows(out: torch.Tensor, ins: AttnInputs) -> torch.Tensor:
    """(B*nW, heads, N, hd) -> (B, H, W, C): merge heads, reverse, roll by +shift, crop."""
    s = ins.shape
    bw, _, n, _ = out.shape
    x = reference.window_reverse(out.transpose(1, 2).reshape(bw, n, s.dim), ins.ws, s.padded, s.padded)
    if s.shift:
        x = torch.roll(x, shifts=(s.shift, s.shift), dims=(1, 2))
    return x[:, : s.res, : s.res].contiguous()


def _block(core: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], ins: AttnInputs):
    def fn(qkv: torch.Tensor) -> torch.Tensor:
        return _from_windows(core(*_to_windows(qkv, ins)), ins)

    return fn


def _shift_mask(ins: AttnInputs) -> torch.Tensor | None:
    s = ins.shape
    if ins.mask is not None or not s.shift:
        return ins.mask
    return reference.shift_mask((s.padded, s.padded), ins.ws, ins.ss, ins.device)


def _shift_labels(ins: AttnInputs) -> torch.Tensor | None:
    s = ins.shape
    if ins.labels is not None or not s.shift:
        return ins.labels
    labels = reference.shift_region_labels((s.padded, s.padded), ins.ws, ins.ss, ins.device)
    return reference.window_partition(labels[None, :, :, None], ins.ws)[..., 0].contiguous()


# ------------------------------------------------------------------------------------------------ SDPA


def _sdpa_core(ins: AttnInputs, mask: torch.Tensor | None, pinned: bool):
    """SDPA on windows with attn_mask = gathered bias (+ shift mask), cast to the input dtype.

    With a shift mask the windows of one image become heads, (B, nW*heads, N, hd), so one
    (1, nW*heads, N, N) mask broadcasts over the batch instead of being expanded per window.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s = ins.shape

    def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bias = reference.gather_relative_bias(ins.table, ins.ws)  # heads, N, N
        if mask is not None:
            am = (bias[None] + mask[:, None]).to(q.dtype).reshape(1, -1, s.tokens, s.tokens)
            q, k, v = (t.reshape(s.batch, s.n_windows * s.heads, s.tokens, s.head_dim) for t in (q, k, v))
        else:
            am = bias.to(q.dtype)[None]
        if pinned:
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=am, scale=ins.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=am, scale=ins.scale)
        return out.reshape(-1, s.heads, s.tokens, s.head_dim)

    return core


# ------------------------------------------------------------------------------------------------ Flex


def _flex_core(ins: AttnInputs):
    """Compiled FlexAttention on windows: bias gathered by relative index in score_mod, shift mask as a
    block mask over region labels (windows are the batch, window b uses labels[b % nW])."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s = ins.shape
    rel = reference.relative_position_index(ins.ws, ins.device)
    table = ins.table

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[rel[q_idx, kv_idx], h]

    block_mask = None
    labels = _shift_labels(ins)
    if labels is not None:
        nw = s.n_windows

        def mask_mod(b, h, q_idx, kv_idx):
            w = b % nw
            return labels[w, q_idx] == labels[w, kv_idx]

        block_mask = create_block_mask(mask_mod, s.batch * nw, None, s.tokens, s.tokens, device=ins.device)

    def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=ins.scale)

    return core


# ------------------------------------------------------------------------------------------------ builders


def _block_ours(backend: str):
    def build(ins: AttnInputs) -> Forward:
        def fn() -> torch.Tensor:
            return ek.shifted_window_attention(ins.qkv, num_heads=ins.shape.heads, window_size=ins.ws,
                                               shift_size=ins.ss, bias_table=ins.table, scale=ins.scale,
                                               backend=backend)

        return Forward(fn, ins.grads())

    return build


def _core_ours(backend: str):
    def build(ins: AttnInputs) -> Forward:
        def fn() -> torch.Tensor:
            return ek.window_attention(ins.q, ins.k, ins.v, window_size=ins.ws, bias_table=ins.table,
                                       mask=ins.mask, scale=ins.scale, backend=backend)

        return Forward(fn, ins.grads())

    return build


def _block_ref(compiled: bool):
    def build(ins: AttnInputs) -> Forward:
        f = reference.shifted_window_attention
        if compiled:
            f = torch.compile(f, dynamic=False)
        return Forward(lambda: f(ins.qkv, ins.shape.heads, ins.ws, ins.ss, ins.table, ins.scale), ins.grads())

    return build


def _core_ref(compiled: bool):
    def build(ins: AttnInputs) -> Forward:
        f = reference.window_attention
        if compiled:
            f = torch.compile(f, dynamic=False)
        return Forward(lambda: f(ins.q, ins.k, ins.v, ins.ws, ins.table, ins.mask, ins.scale), ins.grads())

    return build


def _block_sdpa(pinned: bool):
    def build(ins: AttnInputs) -> Forward:
        fn = _block(_sdpa_core(ins, _shift_mask(ins), pinned), ins)
        return Forward(lambda: fn(ins.qkv), ins.grads())

    return build


def _core_sdpa(pinned: bool):
    def build(ins: AttnInputs) -> Forward:
        core = _sdpa_core(ins, ins.mask, pinned)
        return Forward(lambda: core(ins.q, ins.k, ins.v), ins.grads())

    return build


def _block_flex(ins: AttnInputs) -> Forward:
    fn = torch.compile(_block(_flex_core(ins), ins), dynamic=False)
    return Forward(lambda: fn(ins.qkv), ins.grads())


def _core_flex(ins: AttnInputs) -> Forward:
    fn = torch.compile(_flex_core(ins), dynamic=False)
    return Forward(lambda: fn(ins.q, ins.k, ins.v), ins.grads())


def _layer_timm(ins: AttnInputs) -> Forward:
    blk = ins.block
    return Forward(lambda: blk._attn(ins.x), [ins.x, *blk.parameters()])


def _layer_patched(backend: str):
    def build(ins: AttnInputs) -> Forward:
        blk = ek.patch_timm_swin(copy.deepcopy(ins.block), backend=backend)
        return Forward(lambda: blk._attn(ins.x), [ins.x, *blk.parameters()])

    return build


# ------------------------------------------------------------------------------------------------ registry

_SWA, _WA = "shifted_window_attention", "window_attention"
_TORCH_NOTE = "backend='torch': the eager reference behind the public API (input checks + dispatch)"
_EFF_NOTE = "SDPA, float attn_mask = gathered bias + shift mask, SDPBackend.EFFICIENT_ATTENTION pinned"
_DEF_NOTE = "SDPA, float attn_mask = gathered bias + shift mask, default backend dispatch"
_FLEX_NOTE = "torch.compile(flex_attention): score_mod gathers the bias, shift mask as a block mask"
_TIMM_NOTE = "timm SwinTransformerBlock._attn (qkv Linear, WindowAttention, proj; fused_attn = SDPA + mask)"

PROVIDERS: dict[str, list[Provider]] = {
    "block": [
        Provider("triton", "ours", _block_ours("triton"), backend_check("triton", _SWA)),
        Provider("cuda", "ours", _block_ours("cuda"), backend_check("cuda", _SWA)),
        Provider("torch", "ours", _block_ours("torch"), backend_check("torch", _SWA), note=_TORCH_NOTE),
        Provider("eager_ref", "peer", _block_ref(False), note="official-style eager reference"),
        Provider("sdpa_efficient", "peer", _block_sdpa(True), _cuda_only("EFFICIENT_ATTENTION"), note=_EFF_NOTE),
        Provider("sdpa_default", "peer", _block_sdpa(False), note=_DEF_NOTE),
        Provider("compiled_ref", "peer", _block_ref(True), compiles=True, note="torch.compile(eager reference)"),
        Provider("flex", "peer", _block_flex, _flex_check, compiles=True, note=_FLEX_NOTE),
    ],
    "core": [
        Provider("triton", "ours", _core_ours("triton"), backend_check("triton", _WA)),
        Provider("cuda", "ours", _core_ours("cuda"), backend_check("cuda", _WA)),
        Provider("torch", "ours", _core_ours("torch"), backend_check("torch", _WA), note=_TORCH_NOTE),
        Provider("eager_ref", "peer", _core_ref(False), note="official-style eager reference"),
        Provider("sdpa_efficient", "peer", _core_sdpa(True), _cuda_only("EFFICIENT_ATTENTION"), note=_EFF_NOTE),
        Provider("sdpa_default", "peer", _core_sdpa(False), note=_DEF_NOTE),
        Provider("compiled_ref", "peer", _core_ref(True), compiles=True, note="torch.compile(eager reference)"),
        Provider("flex", "peer", _core_flex, _flex_check, compiles=True, note=_FLEX_NOTE),
    ],
    "layer": [
        Provider("timm+triton", "ours", _layer_patched("triton"), backend_check("triton", _SWA),
                 note="timm block patched by patch_timm_swin(backend='triton')"),
        Provider("timm+cuda", "ours", _layer_patched("cuda"), backend_check("cuda", _SWA),
                 note="timm block patched by patch_timm_swin(backend='cuda')"),
        Provider("timm", "peer", _layer_timm, note=_TIMM_NOTE),
    ],
}
