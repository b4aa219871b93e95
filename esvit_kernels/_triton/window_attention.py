"""Fused Triton kernels for Swin window attention, forward and backward.

Layouts
    * windows layout (``wa_*``): q, k, v (B*nW, heads, N, hd) read through their strides (timm's
      ``qkv.unbind`` views need no copy); optional additive mask (nW, N, N) read in the kernel.
    * map layout (``swa_*``): the (B, H, W, 3C) qkv map. Padding to a multiple of the window, the cyclic
      shift (in either the official pad-then-roll or timm's roll-then-pad order), the window partition,
      the shift mask (region labels compared per pair) and the reverse are all index arithmetic: each
      tile row computes where its token lives in the map. Padding tokens read ``pad_qkv`` (the qkv
      Linear's bias) and take part in attention unmasked, as in the official code.

Tiling
    One program attends one *tile* for one head: G whole windows (G * N <= TILE tokens, G > 1 only for
    small windows, with a block-diagonal mask so windows do not see each other) against all TILE keys.
    N = 49 -> TILE 64; N = 144/196 -> TILE 256 with the queries split into blocks of BM rows.

Backward
    TILE <= 64: one fused kernel per (chunk of tiles, head) recomputes P and writes dQ, dK, dV.
    Larger tiles: a dQ kernel (query blocks) then a dK/dV kernel (key blocks).
    Bias-table gradient: each program sums dS over all the windows it handles in registers (the
    relative index of (i, j) is the same in every window) and writes that (BM, TILE) sum once; a
    deterministic gather-and-sum maps the per-program sums onto the ((2Wh-1)(2Ww-1), heads) table. No
    atomics anywhere: results are deterministic run to run. The padding vector's gradient is reduced the
    same way.

Precision: fp32 accumulation; P and dS are cast to the input dtype before the P@V / dS@K / dS^T@Q
matmuls (as FlashAttention does); fp32 inputs use exact ("ieee") dots. Under ``TRITON_INTERPRET=1`` the
bf16 operands of ``tl.dot`` are upcast to fp32, working around a triton 3.8 interpreter bug (bf16 dots
return garbage there); compiled GPU code keeps bf16 dots.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting

__all__ = ["swa_forward", "swa_backward", "wa_forward", "wa_backward", "tile_config"]

LOG2E = 1.4426950408889634
NEG = -1.0e30  # "minus infinity" for pairs that must not interact (other window, padded tile row)


# ----------------------------------------------------------------------------------------- helpers


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, IS_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IS_F32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _rows(
    tile, t, NW_TOT, n_win, n_ww, H, W, HP, WP, s_b, s_y, s_x, o_sb, o_sy, o_sx,
    G: tl.constexpr, N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr,
    SW: tl.constexpr, LAYOUT: tl.constexpr, ROLL_BEFORE_PAD: tl.constexpr,
):
    """Per tile row t: window id, token n, valid, in-map (not padding), input/output offsets, label."""
    g = t // N
    n = t - g * N
    w = tile * G + g
    valid = (g < G) & (w < NW_TOT)
    w64 = w.to(tl.int64)
    if LAYOUT == 0:
        in_off = w64 * s_b + n * s_y
        out_off = w64 * o_sb + n * o_sy
        inmap = valid
        label = n * 0
    else:
        b = w64 // n_win
        wi = (w64 - b * n_win).to(tl.int32)
        wr = wi // n_ww
        wc = wi - wr * n_ww
        r = n // WW
        c = n - r * WW
        ys = wr * WH + r  # position in the padded, shifted map
        xs = wc * WW + c
        if ROLL_BEFORE_PAD:  # timm: roll the unpadded map, then pad
            inmap = valid & (ys < H) & (xs < W)
            y = (ys + SH) % H
            x = (xs + SW) % W
        else:  # official: pad, then roll the padded map
            y = (ys + SH) % HP
            x = (xs + SW) % WP
            inmap = valid & (y < H) & (x < W)
        in_off = b * s_b + y * s_y + x * s_x
        out_off = b * o_sb + y * o_sy + x * o_sx
        label = n * 0
        if SH > 0:
            label += 3 * ((ys >= HP - WH).to(tl.int32) + (ys >= HP - SH).to(tl.int32))
        if SW > 0:
            label += (xs >= WP - WW).to(tl.int32) + (xs >= WP - SW).to(tl.int32)
    return w, n, valid, inmap, in_off, out_off, label


@triton.jit
def _load_tok(ptr, off, d, inmap, ispad, pad_ptr, HD: tl.constexpr, HAS_PAD: tl.constexpr):
    """(rows, HD_PAD) block of one head's q, k or v; padding rows take the pad vector (or zeros)."""
    dmask = d < HD
    x = tl.load(ptr + off[:, None] + d[None, :], mask=inmap[:, None] & dmask[None, :], other=0.0)
    if HAS_PAD:
        p = tl.load(pad_ptr + d, mask=dmask, other=0.0)
        x = tl.where(ispad[:, None], p[None, :].to(x.dtype), x)
    return x


@triton.jit
def _logits(
    q, k, h, qw, qn, qvalid, qlab, kw, kn, kvalid, klab, scale, bias_ptr, bias_st, bias_sh,
    mask_ptr, m_sw, m_si, n_mask_win,
    WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, LAYOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, IS_F32: tl.constexpr,
):
    """(rows, keys) fp32 logits: q k^T * scale + bias[rel(i, j)] + mask, NEG across windows/padding."""
    s = _dot(q, tl.trans(k), DOT_F32, IS_F32) * scale
    same = (qw[:, None] == kw[None, :]) & kvalid[None, :] & qvalid[:, None]
    if HAS_BIAS:
        ri = qn // WW
        rj = kn // WW
        idx = (ri[:, None] - rj[None, :] + (WH - 1)) * (2 * WW - 1) + (
            (qn - ri * WW)[:, None] - (kn - rj * WW)[None, :] + (WW - 1)
        )
        s += tl.load(bias_ptr + idx * bias_st + h * bias_sh, mask=same, other=0.0).to(tl.float32)
    if HAS_MASK:
        mw = (qw % n_mask_win).to(tl.int64)
        s += tl.load(
            mask_ptr + mw[:, None] * m_sw + qn[:, None] * m_si + kn[None, :], mask=same, other=0.0
        ).to(tl.float32)
    if LAYOUT == 1 and (SH > 0 or SW > 0):
        s += tl.where(qlab[:, None] != klab[None, :], -100.0, 0.0)
    return tl.where(same, s, NEG)


# ----------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, pad_ptr, out_ptr, lse_ptr,
    NW_TOT, n_win, n_ww, H, W, HP, WP, C,
    s_b, s_h, s_y, s_x, o_sb, o_sy, o_sx, bias_st, bias_sh, m_sw, m_si, n_mask_win, scale,
    HEADS: tl.constexpr, N: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr, BM: tl.constexpr,
    HD: tl.constexpr, HD_PAD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr,
    SW: tl.constexpr, LAYOUT: tl.constexpr, ROLL_BEFORE_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_PAD: tl.constexpr, DOT_F32: tl.constexpr, IS_F32: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    tq = tl.program_id(2) * BM + tl.arange(0, BM)
    tk = tl.arange(0, TILE)
    d = tl.arange(0, HD_PAD)
    qw, qn, qvalid, qin, qoff, qoo, qlab = _rows(
        tile, tq, NW_TOT, n_win, n_ww, H, W, HP, WP, s_b, s_y, s_x, o_sb, o_sy, o_sx,
        G, N, WH, WW, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
    kw, kn, kvalid, kin, koff, _, klab = _rows(
        tile, tk, NW_TOT, n_win, n_ww, H, W, HP, WP, s_b, s_y, s_x, o_sb, o_sy, o_sx,
        G, N, WH, WW, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
    hoff = h * s_h
    q = _load_tok(q_ptr + hoff, qoff, d, qin, qvalid & ~qin, pad_ptr + h * HD, HD, HAS_PAD)
    k = _load_tok(k_ptr + hoff, koff, d, kin, kvalid & ~kin, pad_ptr + C + h * HD, HD, HAS_PAD)
    v = _load_tok(v_ptr + hoff, koff, d, kin, kvalid & ~kin, pad_ptr + 2 * C + h * HD, HD, HAS_PAD)
    s = _logits(q, k, h, qw, qn, qvalid, qlab, kw, kn, kvalid, klab, scale, bias_ptr, bias_st, bias_sh,
                mask_ptr, m_sw, m_si, n_mask_win, WH, WW, SH, SW, LAYOUT, HAS_BIAS, HAS_MASK, DOT_F32, IS_F32)
    m = tl.max(s, 1)
    p = tl.exp2((s - m[:, None]) * LOG2E)
    l = tl.sum(p, 1)
    o = _dot(p.to(v.dtype), v, DOT_F32, IS_F32) / l[:, None]
    tl.store(out_ptr + h * HD + qoo[:, None] + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=qin[:, None] & (d < HD)[None, :])
    tl.store(lse_ptr + (qw.to(tl.int64) * HEADS + h) * N + qn, m + tl.log(l), mask=qvalid)


# ----------------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, pad_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr,
    dq_ptr, dk_ptr, dv_ptr, dbias_part_ptr, dpad_part_ptr,
    NW_TOT, n_win, n_ww, H, W, HP, WP, C, tiles_per_prog,
    s_b, s_h, s_y, s_x, o_sb, o_sy, o_sx, bias_st, bias_sh, m_sw, m_si, n_mask_win, scale,
    HEADS: tl.constexpr, N: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr, BM: tl.constexpr,
    HD: tl.constexpr, HD_PAD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr,
    SW: tl.constexpr, LAYOUT: tl.constexpr, ROLL_BEFORE_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_PAD: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_DPAD: tl.constexpr,
    FUSED: tl.constexpr, DOT_F32: tl.constexpr, IS_F32: tl.constexpr,
):
    """dQ for one query block (and, when the tile is one block, dK and dV too) over a chunk of tiles."""
    chunk = tl.program_id(0)
    h = tl.program_id(1)
    qb = tl.program_id(2)
    tq = qb * BM + tl.arange(0, BM)
    tk = tl.arange(0, TILE)
    d = tl.arange(0, HD_PAD)
    dmask = (d < HD)[None, :]
    hoff = h * s_h
    acc_ds = tl.zeros((BM, TILE), dtype=tl.float32)
    pad_dk = tl.zeros((HD_PAD,), dtype=tl.float32)
    pad_dv = tl.zeros((HD_PAD,), dtype=tl.float32)
    for it in range(0, tiles_per_prog):
        tile = chunk * tiles_per_prog + it
        qw, qn, qvalid, qin, qoff, qoo, qlab = _rows(
            tile, tq, NW_TOT, n_win, n_ww, H, W, HP, WP, s_b, s_y, s_x, o_sb, o_sy, o_sx,
            G, N, WH, WW, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
        kw, kn, kvalid, kin, koff, koo, klab = _rows(
            tile, tk, NW_TOT, n_win, n_ww, H, W, HP, WP, s_b, s_y, s_x, o_sb, o_sy, o_sx,
            G, N, WH, WW, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
        q = _load_tok(q_ptr + hoff, qoff, d, qin, qvalid & ~qin, pad_ptr + h * HD, HD, HAS_PAD)
        k = _load_tok(k_ptr + hoff, koff, d, kin, kvalid & ~kin, pad_ptr + C + h * HD, HD, HAS_PAD)
        v = _load_tok(v_ptr + hoff, koff, d, kin, kvalid & ~kin, pad_ptr + 2 * C + h * HD, HD, HAS_PAD)
        omask = qin[:, None] & dmask
        do = tl.load(dout_ptr + h * HD + qoo[:, None] + d[None, :], mask=omask, other=0.0)
        o = tl.load(out_ptr + h * HD + qoo[:, None] + d[None, :], mask=omask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse_off = (qw.to(tl.int64) * HEADS + h) * N + qn
        lse = tl.load(lse_ptr + lse_off, mask=qvalid, other=0.0)
        s = _logits(q, k, h, qw, qn, qvalid, qlab, kw, kn, kvalid, klab, scale, bias_ptr, bias_st, bias_sh,
                    mask_ptr, m_sw, m_si, n_mask_win, WH, WW, SH, SW, LAYOUT, HAS_BIAS, HAS_MASK,
                    DOT_F32, IS_F32)
        p = tl.exp2((s - lse[:, None]) * LOG2E)
        dp = _dot(do, tl.trans(v), DOT_F32, IS_F32)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, DOT_F32, IS_F32) * scale
        # grads: windows layout -> output layout offsets; map layout -> the qkv map's offsets
        gq = qoo if LAYOUT == 0 else qoff
        tl.store(dq_ptr + h * HD + gq[:, None] + d[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=qin[:, None] & dmask)
        if NEED_DBIAS:
            acc_ds += ds
        if FUSED:
            dv = _dot(tl.trans(p).to(do.dtype), do, DOT_F32, IS_F32)
            dk = _dot(tl.trans(ds).to(q.dtype), q, DOT_F32, IS_F32) * scale
            gk = koo if LAYOUT == 0 else koff
            kmask = kin[:, None] & dmask
            tl.store(dk_ptr + h * HD + gk[:, None] + d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=kmask)
            tl.store(dv_ptr + h * HD + gk[:, None] + d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kmask)
            if NEED_DPAD:
                kpad = (kvalid & ~kin)[:, None]
                pad_dk += tl.sum(tl.where(kpad, dk, 0.0), 0)
                pad_dv += tl.sum(tl.where(kpad, dv, 0.0), 0)
        else:
            tl.store(delta_ptr + lse_off, delta, mask=qvalid)
    prog = chunk * HEADS + h
    if NEED_DBIAS:
        tl.store(dbias_part_ptr + (prog.to(tl.int64) * TILE + tq[:, None]) * TILE + tk[None, :], acc_ds)
    if FUSED and NEED_DPAD:
        tl.store(dpad_part_ptr + prog * 2 * HD_PAD + d, pad_dk)
        tl.store(dpad_part_ptr + prog * 2 * HD_PAD + HD_PAD + d, pad_dv)


@triton.jit
def _bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, pad_ptr, dout_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dpad_part_ptr,
    NW_TOT, n_win, n_ww, H, W, HP, WP, C, tiles_per_prog,
    s_b, s_h, s_y, s_x, o_sb, o_sy, o_sx, bias_st, bias_sh, m_sw, m_si, n_mask_win, scale,
    HEADS: tl.constexpr, N: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr, BN: tl.constexpr,
    HD: tl.constexpr, HD_PAD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr,
    SW: tl.constexpr, LAYOUT: tl.constexpr, ROLL_BEFORE_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_PAD: tl.constexpr, NEED_DPAD: tl.constexpr, DOT_F32: tl.constexpr,
    IS_F32: tl.constexpr,
):
    """dK, dV for one key block against all queries of the tile (large windows only)."""
    chunk = tl.program_id(0)
    h = tl.program_id(1)
    kb = tl.program_id(2)
    tk = kb * BN + tl.arange(0, BN)
    tq = tl.arange(0, TILE)
    d = tl.arange(0, HD_PAD)
    dmask = (d < HD)[None, :]
    hoff = h * s_h
    pad_dk = tl.zeros((HD_PAD,), dtype=tl.float32)
    pad_dv = tl.zeros((HD_PAD,), dtype=tl.float32)
    for it in range(0, tiles_per_prog):
        tile = chunk * tiles_per_prog + it
        qw, qn, qvalid, qin, qoff, qoo, qlab = _rows(
            tile, tq, NW_TOT, n_win, n_ww, H, W, HP, WP, s_b, s_y, s_x, o_sb, o_sy, o_sx,
            G, N, WH, WW, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
        kw, kn, kvalid, kin, koff, koo, klab = _rows(
            tile, tk, NW_TOT, n_win, n_ww, H, W, HP, WP, s_b, s_y, s_x, o_sb, o_sy, o_sx,
            G, N, WH, WW, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
        q = _load_tok(q_ptr + hoff, qoff, d, qin, qvalid & ~qin, pad_ptr + h * HD, HD, HAS_PAD)
        k = _load_tok(k_ptr + hoff, koff, d, kin, kvalid & ~kin, pad_ptr + C + h * HD, HD, HAS_PAD)
        v = _load_tok(v_ptr + hoff, koff, d, kin, kvalid & ~kin, pad_ptr + 2 * C + h * HD, HD, HAS_PAD)
        do = tl.load(dout_ptr + h * HD + qoo[:, None] + d[None, :], mask=qin[:, None] & dmask, other=0.0)
        lse_off = (qw.to(tl.int64) * HEADS + h) * N + qn
        lse = tl.load(lse_ptr + lse_off, mask=qvalid, other=0.0)
        delta = tl.load(delta_ptr + lse_off, mask=qvalid, other=0.0)
        # transposed logits: rows = keys of this block, columns = all queries of the tile
        st = _logits(k, q, h, kw, kn, kvalid, klab, qw, qn, qvalid, qlab, scale, bias_ptr, bias_st, bias_sh,
                     mask_ptr, m_sw, m_si, n_mask_win, WH, WW, SH, SW, LAYOUT, False, False, DOT_F32, IS_F32)
        if HAS_BIAS:  # bias[rel(query, key)]: the query is the column here
            same = (qw[None, :] == kw[:, None]) & kvalid[:, None] & qvalid[None, :]
            ri = qn // WW
            rj = kn // WW
            idx = (ri[None, :] - rj[:, None] + (WH - 1)) * (2 * WW - 1) + (
                (qn - ri * WW)[None, :] - (kn - rj * WW)[:, None] + (WW - 1)
            )
            st += tl.load(bias_ptr + idx * bias_st + h * bias_sh, mask=same, other=0.0).to(tl.float32)
        if HAS_MASK:
            same = (qw[None, :] == kw[:, None]) & kvalid[:, None] & qvalid[None, :]
            mw = (qw % n_mask_win).to(tl.int64)
            st += tl.load(mask_ptr + mw[None, :] * m_sw + qn[None, :] * m_si + kn[:, None], mask=same,
                          other=0.0).to(tl.float32)
        pt = tl.exp2((st - lse[None, :]) * LOG2E)
        dv = _dot(pt.to(do.dtype), do, DOT_F32, IS_F32)
        dpt = _dot(v, tl.trans(do), DOT_F32, IS_F32)
        dst = pt * (dpt - delta[None, :])
        dk = _dot(dst.to(q.dtype), q, DOT_F32, IS_F32) * scale
        gk = koo if LAYOUT == 0 else koff
        kmask = kin[:, None] & dmask
        tl.store(dk_ptr + h * HD + gk[:, None] + d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=kmask)
        tl.store(dv_ptr + h * HD + gk[:, None] + d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kmask)
        if NEED_DPAD:
            kpad = (kvalid & ~kin)[:, None]
            pad_dk += tl.sum(tl.where(kpad, dk, 0.0), 0)
            pad_dv += tl.sum(tl.where(kpad, dv, 0.0), 0)
    if NEED_DPAD:
        prog = (chunk * HEADS + h) * tl.num_programs(2) + kb
        tl.store(dpad_part_ptr + prog * 2 * HD_PAD + d, pad_dk)
        tl.store(dpad_part_ptr + prog * 2 * HD_PAD + HD_PAD + d, pad_dv)


# ----------------------------------------------------------------------------------------- launchers


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@functools.cache
def tile_config(window: tuple[int, int], head_dim: int) -> dict:
    """Tile geometry for a window: tokens N, windows per tile G, TILE, query/key block sizes, warps."""
    n = window[0] * window[1]
    tile = max(16, _next_pow2(n))
    if tile < 64:  # small windows: pack several whole windows into one 64-row tile
        tile = 64
    g = tile // n if 2 * n <= tile else 1
    fused = tile <= 64
    return {
        "N": n, "G": g, "TILE": tile,
        "BM_FWD": tile if tile <= 64 else 64,
        "BM_BWD": tile if fused else 32,
        "BN_BWD": 32,
        "FUSED": fused,
        "HD_PAD": max(16, _next_pow2(head_dim)),
        "WARPS": 4 if tile <= 64 else 8,
    }


def _num_chunks(n_tiles: int, heads: int, blocks: int, device: torch.device) -> int:
    """Programs per head-and-block for the backward: a few waves of the GPU, each looping over tiles."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(n_tiles, -(-target // (heads * blocks))))


@functools.cache
def _bias_gather_index(window: tuple[int, int], g: int, tile: int, device_str: str) -> torch.Tensor:
    """(T, maxc) flat (i * TILE + j) positions of the tile whose pair (i, j) uses table entry t
    (same window only); padded with TILE*TILE, the index of an appended zero."""
    wh, ww = window
    n = wh * ww
    r = torch.arange(n) // ww
    c = torch.arange(n) % ww
    rel = ((r[:, None] - r[None, :] + wh - 1) * (2 * ww - 1) + (c[:, None] - c[None, :] + ww - 1)).reshape(-1)
    base = (torch.arange(n)[:, None] * tile + torch.arange(n)[None, :]).reshape(-1)
    pos = torch.cat([base + gi * n * (tile + 1) for gi in range(g)])
    rel = rel.repeat(g)
    t_entries = (2 * wh - 1) * (2 * ww - 1)
    order = torch.argsort(rel, stable=True)
    rel, pos = rel[order], pos[order]
    counts = torch.bincount(rel, minlength=t_entries)
    maxc = int(counts.max())
    idx = torch.full((t_entries, maxc), tile * tile, dtype=torch.long)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rel.numel()) - start[rel]
    idx[rel, slot] = pos
    return idx.to(device_str)


def _reduce_dbias(part: torch.Tensor, window, g: int, tile: int) -> torch.Tensor:
    """(programs, heads, TILE, TILE) per-program dS sums -> (T, heads) table gradient, deterministic."""
    heads = part.shape[1]
    flat = part.sum(0).reshape(heads, tile * tile)
    flat = torch.cat([flat, flat.new_zeros(heads, 1)], 1)
    idx = _bias_gather_index(tuple(window), g, tile, str(part.device))
    return flat[:, idx].sum(-1).t().contiguous()


def _common(dtype: torch.dtype) -> dict:
    return {
        "DOT_F32": triton_interpreting() and dtype == torch.bfloat16,
        "IS_F32": dtype == torch.float32,
    }


def _bias_args(bias_table, dummy):
    if bias_table is None:
        return dummy, 0, 0
    return bias_table, bias_table.stride(0), bias_table.stride(1)


def _map_geometry(qkv, num_heads, window, shift):
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    wh, ww = window
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    n_wh, n_ww = hp // wh, wp // ww
    return {"B": b, "H": h, "W": w, "C": c, "HD": c // num_heads, "HP": hp, "WP": wp,
            "n_win": n_wh * n_ww, "n_ww": n_ww, "NW_TOT": b * n_wh * n_ww}


def swa_forward(qkv, bias_table, pad_qkv, num_heads, window, shift, scale, roll_before_pad):
    """Map layout forward: (out (B, H, W, C), lse (B*nW, heads, N) fp32)."""
    g_ = _map_geometry(qkv, num_heads, window, shift)
    cfg = tile_config(tuple(window), g_["HD"])
    out = qkv.new_empty(g_["B"], g_["H"], g_["W"], g_["C"])
    lse = qkv.new_empty(g_["NW_TOT"], num_heads, cfg["N"], dtype=torch.float32)
    n_tiles = -(-g_["NW_TOT"] // cfg["G"])
    bias, bst, bsh = _bias_args(bias_table, qkv)
    c = g_["C"]
    grid = (n_tiles, num_heads, cfg["TILE"] // cfg["BM_FWD"])
    _fwd_kernel[grid](
        qkv, qkv[..., c:], qkv[..., 2 * c:], bias, qkv, pad_qkv if pad_qkv is not None else qkv, out, lse,
        g_["NW_TOT"], g_["n_win"], g_["n_ww"], g_["H"], g_["W"], g_["HP"], g_["WP"], c,
        qkv.stride(0), g_["HD"], qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1), out.stride(2),
        bst, bsh, 0, 0, 1, scale,
        HEADS=num_heads, N=cfg["N"], G=cfg["G"], TILE=cfg["TILE"], BM=cfg["BM_FWD"], HD=g_["HD"],
        HD_PAD=cfg["HD_PAD"], WH=window[0], WW=window[1], SH=shift[0], SW=shift[1], LAYOUT=1,
        ROLL_BEFORE_PAD=bool(roll_before_pad), HAS_BIAS=bias_table is not None, HAS_MASK=False,
        HAS_PAD=pad_qkv is not None, num_warps=cfg["WARPS"], **_common(qkv.dtype),
    )
    return out, lse


def _backward(layout, q, k, v, out, dout, lse, bias_table, mask, pad, geo, window, shift, scale, rbp,
              dq, dk, dv, need_dbias, need_dpad, strides, mask_args):
    """Shared backward launcher for both layouts; returns (dbias or empty, (heads, 2, hd) dK/dV sums over
    padding tokens or None)."""
    heads, hd = geo["heads"], geo["HD"]
    cfg = tile_config(tuple(window), hd)
    n_tiles = -(-geo["NW_TOT"] // cfg["G"])
    need_dbias = need_dbias and bias_table is not None
    need_dpad = need_dpad and pad is not None
    dev = q.device
    nq = cfg["TILE"] // cfg["BM_BWD"]
    chunks = _num_chunks(n_tiles, heads, nq, dev)
    tpp = -(-n_tiles // chunks)
    chunks = -(-n_tiles // tpp)
    bias, bst, bsh = _bias_args(bias_table, q)
    f32 = torch.float32
    dbias_part = torch.empty(chunks, heads, cfg["TILE"], cfg["TILE"], device=dev, dtype=f32) if need_dbias else lse
    delta = lse if cfg["FUSED"] else torch.empty_like(lse)
    nk = 1 if cfg["FUSED"] else cfg["TILE"] // cfg["BN_BWD"]
    dpad_part = (torch.zeros(chunks * heads * nk, 2, cfg["HD_PAD"], device=dev, dtype=f32)
                 if need_dpad else lse)
    padp = pad if pad is not None else q
    geo_args = (geo["NW_TOT"], geo["n_win"], geo["n_ww"], geo["H"], geo["W"], geo["HP"], geo["WP"], geo["C"], tpp)
    stride_args = (*strides, bst, bsh, *mask_args, scale)
    consts = dict(
        HEADS=heads, N=cfg["N"], G=cfg["G"], TILE=cfg["TILE"], HD=hd, HD_PAD=cfg["HD_PAD"], WH=window[0],
        WW=window[1], SH=shift[0], SW=shift[1], LAYOUT=layout, ROLL_BEFORE_PAD=bool(rbp),
        HAS_BIAS=bias_table is not None, HAS_MASK=mask is not None, HAS_PAD=pad is not None,
        NEED_DPAD=need_dpad, num_warps=cfg["WARPS"], **_common(q.dtype),
    )
    maskp = mask if mask is not None else q
    _bwd_dq_kernel[(chunks, heads, nq)](
        q, k, v, bias, maskp, padp, out, dout, lse, delta, dq, dk, dv, dbias_part, dpad_part,
        *geo_args, *stride_args, BM=cfg["BM_BWD"], NEED_DBIAS=need_dbias, FUSED=cfg["FUSED"], **consts,
    )
    if not cfg["FUSED"]:
        _bwd_dkv_kernel[(chunks, heads, nk)](
            q, k, v, bias, maskp, padp, dout, lse, delta, dk, dv, dpad_part,
            *geo_args, *stride_args, BN=cfg["BN_BWD"], **consts,
        )
    dbias = (_reduce_dbias(dbias_part, window, cfg["G"], cfg["TILE"]) if need_dbias
             else q.new_empty(0, dtype=f32))
    # per-program (chunk, head, key block) sums of the padding rows' dK, dV -> (heads, 2, hd)
    dpad = dpad_part.view(chunks, heads, nk, 2, cfg["HD_PAD"]).sum((0, 2))[..., :hd] if need_dpad else None
    return dbias, dpad


def swa_backward(dout, qkv, out, lse, bias_table, pad_qkv, num_heads, window, shift, scale, roll_before_pad,
                 need_dbias, need_dpad):
    """Map layout backward: (dqkv like qkv, dbias (T, heads) fp32 or empty, dpad (3C,) fp32 or empty)."""
    geo = _map_geometry(qkv, num_heads, window, shift)
    geo["heads"] = num_heads
    c = geo["C"]
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    strides = (qkv.stride(0), geo["HD"], qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1), out.stride(2))
    dbias, dpad_kv = _backward(
        1, qkv, qkv[..., c:], qkv[..., 2 * c:], out, dout, lse, bias_table, None, pad_qkv, geo, window, shift,
        scale, roll_before_pad, dqkv, dqkv[..., c:], dqkv[..., 2 * c:], need_dbias, need_dpad, strides, (0, 0, 1),
    )
    dpad = qkv.new_empty(0, dtype=torch.float32)
    if dpad_kv is not None:  # the q part stays zero: padded outputs are discarded, so their dQ is 0
        dpad = torch.cat([torch.zeros_like(dpad_kv[:, 0]).reshape(-1), dpad_kv[:, 0].reshape(-1),
                          dpad_kv[:, 1].reshape(-1)])
    return dqkv, dbias, dpad


def _windows_strides(q, k, v):
    if not (q.stride() == k.stride() == v.stride()):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


def wa_forward(q, k, v, bias_table, mask, window, scale):
    """Windows layout forward: (out (BW, heads, N, hd) as a view of (BW, N, heads, hd), lse)."""
    q, k, v = _windows_strides(q, k, v)
    bw, heads, n, hd = q.shape
    cfg = tile_config(tuple(window), hd)
    buf = q.new_empty(bw, n, heads, hd)
    lse = q.new_empty(bw, heads, n, dtype=torch.float32)
    n_tiles = -(-bw // cfg["G"])
    bias, bst, bsh = _bias_args(bias_table, q)
    m_args = (mask.stride(0), mask.stride(1), mask.shape[0]) if mask is not None else (0, 0, 1)
    _fwd_kernel[(n_tiles, heads, cfg["TILE"] // cfg["BM_FWD"])](
        q, k, v, bias, mask if mask is not None else q, q, buf, lse,
        bw, 1, 1, 0, 0, 0, 0, 0,
        q.stride(0), q.stride(1), q.stride(2), 0, buf.stride(0), buf.stride(1), 0,
        bst, bsh, *m_args, scale,
        HEADS=heads, N=n, G=cfg["G"], TILE=cfg["TILE"], BM=cfg["BM_FWD"], HD=hd, HD_PAD=cfg["HD_PAD"],
        WH=window[0], WW=window[1], SH=0, SW=0, LAYOUT=0, ROLL_BEFORE_PAD=False,
        HAS_BIAS=bias_table is not None, HAS_MASK=mask is not None, HAS_PAD=False,
        num_warps=cfg["WARPS"], **_common(q.dtype),
    )
    return buf.transpose(1, 2), lse


def wa_backward(dout, q, k, v, out, lse, bias_table, mask, window, scale, need_dbias):
    """Windows layout backward: (dq, dk, dv laid out like out, dbias (T, heads) fp32 or empty)."""
    q, k, v = _windows_strides(q, k, v)
    bw, heads, n, hd = q.shape
    # the kernels address out/dout/dq/dk/dv through the (BW, N, heads, hd) buffer's strides
    if dout.stride() != out.stride():
        dout = dout.transpose(1, 2).contiguous().transpose(1, 2)
    grads = [q.new_empty(bw, n, heads, hd).transpose(1, 2) for _ in range(3)]
    geo = {"NW_TOT": bw, "n_win": 1, "n_ww": 1, "H": 0, "W": 0, "HP": 0, "WP": 0, "C": 0, "heads": heads,
           "HD": hd}
    strides = (q.stride(0), q.stride(1), q.stride(2), 0, out.stride(0), out.stride(2), 0)
    m_args = (mask.stride(0), mask.stride(1), mask.shape[0]) if mask is not None else (0, 0, 1)
    dbias, _ = _backward(0, q, k, v, out, dout, lse, bias_table, mask, None, geo, window, (0, 0), scale, False,
                         *grads, need_dbias, False, strides, m_args)
    return (*grads, dbias)
