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

ViL scope (``vil``): ours (``neighborhood_window_attention``, triton / torch); the official-style eager path
(pad, partition, the 3x3 neighbourhood of every window as an ``unfold`` of the zero-padded window grid,
i.e. 9 copies of K and V, einsum, gathered bias, explicit mask, softmax over [global, local], einsum);
SDPA over all H*W tokens plus the global one with a dense float ``attn_mask`` (bias where a pair is in the
neighbourhood, -inf elsewhere; gathered in every call); FlexAttention with the bias in ``score_mod`` and the
neighbourhood as a block mask (sparse: blocks outside every window's neighbourhood are skipped). The index
and validity tensors depend only on the shape and are built at setup.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

import esvit_kernels as ek
from esvit_kernels import reference

from .attention import AttnInputs, ViLInputs
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


# ------------------------------------------------------------------------------------------------ ViL


def _vil_windows(x: torch.Tensor, ins: ViLInputs) -> torch.Tensor:
    """(B, H, W, C) -> zero-padded, partitioned (B, heads, mx, my, w*w, hd)."""
    s = ins.shape
    w, g = s.window, s.grid
    x = F.pad(x, (0, 0, 0, g * w - s.res, 0, g * w - s.res))
    x = x.view(s.batch, g, w, g, w, s.heads, s.head_dim).permute(0, 5, 1, 3, 2, 4, 6)
    return x.reshape(s.batch, s.heads, g, g, w * w, s.head_dim)


def _vil_eager(ins: ViLInputs) -> Forward:
    """Official-style eager ViL attention (MODE 0, zero padding): unfold the 3x3 window neighbourhood."""
    from esvit_kernels.reference import neighborhood as nb

    s = ins.shape
    w, g, ll = s.window, s.grid, s.window**2
    idx = nb.neighborhood_relative_index(w, tuple(range(9)), ins.device)  # (L, 9L)
    valid = nb.neighborhood_valid((s.res, s.res), w, tuple(range(9)), 0, ins.device)  # (mx, my, L, 9L)

    def neighbours(x: torch.Tensor) -> torch.Tensor:  # (B, h, mx, my, L, d) -> (B, h, mx, my, 9L, d)
        x = F.pad(x, (0, 0, 0, 0, 1, 1, 1, 1)).unfold(2, 3, 1).unfold(3, 3, 1)  # (..., L, d, 3, 3)
        return x.permute(0, 1, 2, 3, 6, 7, 4, 5).reshape(s.batch, s.heads, g, g, 9 * ll, s.head_dim)

    def fn() -> torch.Tensor:
        q = _vil_windows(ins.q, ins) * ins.scale
        kn, vn = neighbours(_vil_windows(ins.k, ins)), neighbours(_vil_windows(ins.v, ins))
        gk = ins.global_k.view(s.batch, s.nglo, s.heads, s.head_dim).transpose(1, 2)
        gv = ins.global_v.view(s.batch, s.nglo, s.heads, s.head_dim).transpose(1, 2)
        attn = torch.einsum("bhmnld,bhmntd->bhmnlt", q, kn) + ins.table[idx].permute(2, 0, 1).to(q.dtype)[
            None, :, None, None]
        attn = attn.masked_fill(~valid, float("-inf"))
        attn_g = torch.einsum("bhmnld,bhgd->bhmnlg", q, gk) + ins.global_bias.to(q.dtype)[None, :, None, None, None]
        p = torch.cat([attn_g, attn], -1).softmax(-1)
        out = torch.einsum("bhmnlt,bhmntd->bhmnld", p[..., s.nglo:], vn)
        out = out + torch.einsum("bhmnlg,bhgd->bhmnld", p[..., : s.nglo], gv)
        out = out.view(s.batch, s.heads, g, g, w, w, s.head_dim).permute(0, 2, 4, 3, 5, 1, 6)
        return out.reshape(s.batch, g * w, g * w, s.dim)[:, : s.res, : s.res]

    return Forward(fn, ins.grads())


def _vil_dense_index(ins: ViLInputs) -> torch.Tensor:
    """(HW, HW) table index of every (query, key) token pair of the map, -1 outside the neighbourhood: for
    keys in the 3x3 window neighbourhood the index depends only on the position difference."""
    s = ins.shape
    w = s.window
    pos = torch.arange(s.res * s.res, device=ins.device)
    r, c = pos // s.res, pos % s.res
    near = ((r[:, None] // w - r[None, :] // w).abs() <= 1) & ((c[:, None] // w - c[None, :] // w).abs() <= 1)
    idx = (r[:, None] - r[None, :] + 2 * w - 1) * (4 * w - 1) + (c[:, None] - c[None, :] + 2 * w - 1)
    return torch.where(near, idx, -1).to(torch.int32)


def _vil_tokens(ins: ViLInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, heads, HW, hd) and k, v with the global tokens first (B, heads, G + HW, hd)."""
    s = ins.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(s.batch, -1, s.heads, s.head_dim).transpose(1, 2)

    k = torch.cat([ins.global_k, ins.k.reshape(s.batch, -1, s.dim)], 1)
    v = torch.cat([ins.global_v, ins.v.reshape(s.batch, -1, s.dim)], 1)
    return heads(ins.q), heads(k), heads(v)


def _vil_out(out: torch.Tensor, ins: ViLInputs) -> torch.Tensor:
    s = ins.shape
    return out.transpose(1, 2).reshape(s.batch, s.res, s.res, s.dim)


def _vil_sdpa(pinned: bool):
    def build(ins: ViLInputs) -> Forward:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        s = ins.shape
        idx = _vil_dense_index(ins).long()
        n_entries = ins.table.shape[0]
        idx = torch.where(idx < 0, n_entries, idx)  # the appended -inf row

        def fn() -> torch.Tensor:
            q, k, v = _vil_tokens(ins)
            table = torch.cat([ins.table, ins.table.new_full((1, s.heads), float("-inf"))])
            local = table[idx].permute(2, 0, 1)  # (heads, HW, HW)
            glob = ins.global_bias[:, None, :].expand(s.heads, s.res * s.res, s.nglo)
            mask = torch.cat([glob, local], -1)[None].to(q.dtype)
            ctx = sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION) if pinned else contextlib.nullcontext()
            with ctx:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=ins.scale)
            return _vil_out(out, ins)

        return Forward(fn, ins.grads())

    return build


def _vil_flex_fn(ins: ViLInputs):
    """FlexAttention over [global, local] tokens: score_mod adds the global bias or the gathered table
    entry, the block mask keeps the global keys and each query's 3x3 window neighbourhood."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s = ins.shape
    g = s.nglo
    idx = _vil_dense_index(ins)
    valid = idx >= 0
    idx = idx.clamp(min=0)
    table, gbias = ins.table, ins.global_bias

    def score_mod(score, b, h, q_idx, kv_idx):
        j = (kv_idx - g).clamp(min=0)
        glob = gbias[h, kv_idx.clamp(max=g - 1)]
        return score + torch.where(kv_idx < g, glob, table[idx[q_idx, j], h])

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < g) | valid[q_idx, (kv_idx - g).clamp(min=0)]

    n = s.res * s.res
    block_mask = create_block_mask(mask_mod, None, None, n, n + g, device=ins.device)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=ins.scale)

    return fn


def _vil_flex(ins: ViLInputs) -> Forward:
    core = torch.compile(_vil_flex_fn(ins), dynamic=False)
    return Forward(lambda: _vil_out(core(*_vil_tokens(ins)), ins), ins.grads())


def _vil_ours(backend: str):
    def build(ins: ViLInputs) -> Forward:
        s = ins.shape

        def fn() -> torch.Tensor:
            return ek.neighborhood_window_attention(
                ins.q, ins.k, ins.v, s.heads, s.window, ins.global_k, ins.global_v, ins.table, ins.global_bias,
                scale=ins.scale, backend=backend)

        return Forward(fn, ins.grads())

    return build


# ------------------------------------------------------------------------------------------------ registry

_SWA, _WA, _NWA = "shifted_window_attention", "window_attention", "neighborhood_window_attention"
_VIL_SDPA_NOTE = ("SDPA over all H*W tokens + the global one, dense float attn_mask (bias in the neighbourhood, "
                  "-inf out)")
_VIL_FLEX_NOTE = "torch.compile(flex_attention): score_mod gathers the biases, the 3x3 neighbourhood as a block mask"
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
    "vil": [
        Provider("triton", "ours", _vil_ours("triton"), backend_check("triton", _NWA)),
        Provider("torch", "ours", _vil_ours("torch"), backend_check("torch", _NWA), note=_TORCH_NOTE),
        Provider("eager_unfold", "peer", _vil_eager, note="official-style eager path: unfold the 3x3 window "
                 "neighbourhood (9 copies of K/V), einsum, gathered bias, explicit mask"),
        Provider("sdpa_efficient", "peer", _vil_sdpa(True), _cuda_only("EFFICIENT_ATTENTION"), note=_VIL_SDPA_NOTE
                 + ", EFFICIENT_ATTENTION pinned"),
        Provider("sdpa_default", "peer", _vil_sdpa(False), note=_VIL_SDPA_NOTE + ", default dispatch"),
        Provider("flex", "peer", _vil_flex, _flex_check, compiles=True, note=_VIL_FLEX_NOTE),
    ],
    "layer": [
        Provider("timm+triton", "ours", _layer_patched("triton"), backend_check("triton", _SWA),
                 note="timm block patched by patch_timm_swin(backend='triton')"),
        Provider("timm+cuda", "ours", _layer_patched("cuda"), backend_check("cuda", _SWA),
                 note="timm block patched by patch_timm_swin(backend='cuda')"),
        Provider("timm", "peer", _layer_timm, note=_TIMM_NOTE),
    ],
}
