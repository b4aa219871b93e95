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
    N = 49 -> TILE 64; N = 144/196 -> TILE 256 with the queries split into blocks of BM rows. Where a whole
    tile does not fit registers and shared memory (large tiles in fp32 or at head_dim 128, fp32 at head_dim
    > 32, and the 64-row blocks of large half-precision tiles) the keys (forward, dQ) or queries (dK/dV) are
    walked in 4 chunks: an online softmax in the forward, 4 rotating dbias accumulators in dQ. Each launch
    takes the first of its candidate configurations whose shared memory fits the device
    (:func:`launch_candidates`, :func:`.aot.launch`).
    Inside the tile loops nothing divides by a runtime size: with one window per tile the program splits
    its first tile's window into (image, window row, window column) once and steps it per tile; a row's
    place in the map is then constexpr arithmetic and a conditional subtract for the roll, in int32
    offsets inside one sample plus the sample's int64 base (per-tile scalar). Heads are the fast grid
    axis, so the heads of a tile run together and share its qkv rows in L2.

Non-finite values and masked rows
    Pairs of different windows are *selected* to -inf (NaN + a large negative number would stay NaN). A
    query whose logits are all -inf gets output 0 and lse +inf (zero gradients). Packed windows (G > 1)
    must not exchange NaN/inf through the dots either (0 * NaN is NaN): every kernel runs twice. The first
    pass is the plain kernel and flags each program whose results (forward: whose V) hold a non-finite
    value; the second (SAFE) pass redoes just the flagged programs with dS and P selected to their window,
    the dot operands zeroed where not finite and the products made NaN exactly where the dense per-window
    product is (_poison). Common case: a zeroed flag buffer and one more launch whose programs exit at
    once; the first pass keeps about the registers (occupancy) of the plain kernel, where a slow path
    inside the kernels (tried first) cost up to 3x the registers of some variants.

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

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting
from . import aot
from .aot import launch

__all__ = ["swa_forward", "swa_backward", "wa_forward", "wa_backward", "tile_config"]

# module constants read inside @triton.jit functions must be constexpr for the compiler
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


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
def _finite(x):
    """Not NaN and not +-inf."""
    return tl.abs(x.to(tl.float32)) < float("inf")


@triton.jit
def _flag_nonfinite(flag_ptr, prog, row_sums):
    """First pass with packed windows: flag the program when a row sum of one tile's results is not finite
    (NaN and inf survive a sum; a finite sum that overflows only costs a needless SAFE redo): one
    reduction, a store that is issued only then."""
    tl.store(flag_ptr + prog, 1, mask=tl.max((~_finite(row_sums)).to(tl.int32), 0) > 0)


@triton.jit
def _tiles_to_do(flag_ptr, prog, chunk, tiles_per_prog, NW_TOT, G: tl.constexpr, SAFE: tl.constexpr):
    """The chunk's tiles that exist (the last chunk may hold fewer); in the SAFE pass none unless the first
    pass flagged the program."""
    n = tl.minimum(tiles_per_prog, (NW_TOT + G - 1) // G - chunk * tiles_per_prog)
    if SAFE:
        n = n * (tl.load(flag_ptr + prog) != 0).to(tl.int32)
    return n


@triton.jit
def _redone(flag_ptr, prog, SAFE: tl.constexpr):
    """Whether this program's per-program partial sums are to be written: always in the first pass, in
    the SAFE pass only for a flagged program (the others keep the first pass's)."""
    if SAFE:
        ok = tl.load(flag_ptr + prog) != 0
    else:
        ok = True
    return ok


@triton.jit
def _poison(acc, rows, cols, bad, N: tl.constexpr, DOT_F32: tl.constexpr, IS_F32: tl.constexpr):
    """acc (rows, HD) made NaN where the row's own window holds a non-finite operand in that column (rows,
    cols: tile positions of acc's rows and of the operand's rows; bad: the operand is not finite there):
    exactly where the dense per-window product (the reference) is non-finite. With packed windows the
    products run on operands whose non-finite entries were zeroed, since another window's NaN times a 0
    of P or dS would be NaN (0 * NaN) in every row of the tile; this puts them back, in their window only.
    Runs in the SAFE pass only."""
    own = ((rows // N)[:, None] == (cols // N)[None, :]).to(acc.dtype if IS_F32 else tl.float16)
    hits = _dot(own, bad.to(own.dtype), DOT_F32, IS_F32)  # padding rows of the tile are 0s
    return tl.where(hits > 0.0, float("nan"), acc)


@triton.jit
def _first_window(tile, n_win, n_ww, G: tl.constexpr, LAYOUT: tl.constexpr):
    """(image, window row, window column) of the first window of ``tile``: int32 scalars, computed once per
    program before its tile loop (with one window per tile, :func:`_next_window` walks on from there, so the
    loop divides by no runtime size)."""
    if LAYOUT == 1 and G == 1:
        b = tile // n_win
        wi = tile - b * n_win
        wr = wi // n_ww
        wc = wi - wr * n_ww
    else:  # unused
        b = tile * 0
        wr = b
        wc = b
    return b, wr, wc


@triton.jit
def _next_window(b, wr, wc, n_win, n_ww, G: tl.constexpr, LAYOUT: tl.constexpr):
    """The window after (b, wr, wc) in (image, row, column) order, the next tile's when G == 1."""
    if LAYOUT == 1 and G == 1:
        wc = wc + 1
        row_done = wc == n_ww
        wc = tl.where(row_done, 0, wc)
        wr = tl.where(row_done, wr + 1, wr)
        img_done = wr * n_ww == n_win
        wr = tl.where(img_done, 0, wr)
        b = tl.where(img_done, b + 1, b)
    return b, wr, wc


@triton.jit
def _shifts(H, W, HP, WP, SH: tl.constexpr, SW: tl.constexpr, LAYOUT: tl.constexpr,
            ROLL_BEFORE_PAD: tl.constexpr):
    """The cyclic shift reduced modulo the rolled extent (the map with timm's order, the padded map with
    the official one): once per program, so that a row's rolled position needs one conditional subtract."""
    if LAYOUT == 1:
        if ROLL_BEFORE_PAD:
            sy = SH % H
            sx = SW % W
        else:
            sy = SH % HP
            sx = SW % WP
    else:
        sy = 0
        sx = 0
    return sy, sx


@triton.jit
def _rows(
    tile, t, b, wr, wc, NW_TOT, n_win, n_ww, H, W, HP, WP, sy, sx, s_b, s_y, s_x, o_sb, o_sy, o_sx,
    G: tl.constexpr, N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr,
    SW: tl.constexpr, LAYOUT: tl.constexpr, ROLL_BEFORE_PAD: tl.constexpr,
):
    """Per tile row t: window id w, token n, valid, in-map (not padding), the base offsets of the row's
    image (input, output; int64, per-tile scalars when G == 1) and the row's offsets inside it (int32),
    region label. With one window per tile (G == 1) the window's (image, row, column) are the per-tile
    scalars (b, wr, wc) and every row t < N is valid (the loop visits only existing tiles): the rows need
    no division by a runtime size, only by constexprs (N, WW), and a conditional subtract for the roll.
    G > 1 divides by the map's sizes in int32."""
    if G == 1:
        n = t
        w = tile
        valid = t < N
    else:
        g = t // N
        n = t - g * N
        w = tile * G + g
        valid = (g < G) & (w < NW_TOT)
    if LAYOUT == 0:
        img = w.to(tl.int64) * s_b
        out_img = w.to(tl.int64) * o_sb
        in_off = n * s_y
        out_off = n * o_sy
        inmap = valid
        label = n * 0
    else:
        if G == 1:
            bb = b
            r_w = wr
            c_w = wc
        else:
            bb = w // n_win
            wi = w - bb * n_win
            r_w = wi // n_ww
            c_w = wi - r_w * n_ww
        r = n // WW
        c = n - r * WW
        ys = r_w * WH + r  # position in the padded, shifted map
        xs = c_w * WW + c
        y = ys + sy
        x = xs + sx
        if ROLL_BEFORE_PAD:  # timm: roll the unpadded map, then pad (y < 2H for the rows in the map)
            inmap = valid & (ys < H) & (xs < W)
            y = tl.where(y >= H, y - H, y)
            x = tl.where(x >= W, x - W, x)
        else:  # official: pad, then roll the padded map
            y = tl.where(y >= HP, y - HP, y)
            x = tl.where(x >= WP, x - WP, x)
            inmap = valid & (y < H) & (x < W)
        img = bb.to(tl.int64) * s_b
        out_img = bb.to(tl.int64) * o_sb
        in_off = y * s_y + x * s_x
        out_off = y * o_sy + x * o_sx
        # shift-mask region label: the official labels (3 * [ys >= HP - WH] + 3 * [ys >= HP - SH] + the same
        # for x) differ within a window only in the last window row (column) of the map, and there by
        # whether the token is in the window's last SH rows (SW columns): label = code & tile bits, with code
        # depending on the token alone (loop-invariant) and the bits on the window alone (per-tile scalars)
        code = n * 0
        bits = r_w * 0
        if SH > 0:
            code += 2 * (r >= WH - SH).to(tl.int32)
            bits += 2 * ((r_w + 1) * WH == HP).to(tl.int32)
        if SW > 0:
            code += (c >= WW - SW).to(tl.int32)
            bits += ((c_w + 1) * WW == WP).to(tl.int32)
        label = code & bits
    return w, n, valid, inmap, img, in_off, out_img, out_off, label


@triton.jit
def _ptrs(ptr, img, off, d, G: tl.constexpr):
    """(rows, HD_PAD) pointers ptr + img + off + d: img a per-tile int64 scalar when G == 1 (the 64-bit
    addition happens once), an int64 row vector otherwise."""
    if G == 1:
        p = (ptr + img) + off[:, None] + d[None, :]
    else:
        p = ptr + (img + off)[:, None] + d[None, :]
    return p


@triton.jit
def _lse_ptrs(lse_ptr, w, n, h, HEADS: tl.constexpr, N: tl.constexpr, G: tl.constexpr):
    """Pointers to the (windows, heads, N) lse (and delta) of the rows; the window's base is a scalar when
    G == 1."""
    if G == 1:
        p = (lse_ptr + (w.to(tl.int64) * HEADS + h) * N) + n
    else:
        p = lse_ptr + (w.to(tl.int64) * HEADS + h) * N + n
    return p


@triton.jit
def _same(qw, kw, qvalid, kvalid, G: tl.constexpr):
    """Pairs that may interact: both rows valid and, with packed windows, in the same window."""
    if G == 1:
        same = qvalid[:, None] & kvalid[None, :]
    else:
        same = (qw[:, None] == kw[None, :]) & qvalid[:, None] & kvalid[None, :]
    return same


@triton.jit
def _mask_rows(w, n, n_mask_win, m_sw, m_si, HAS_MASK: tl.constexpr):
    """Offsets of the rows into the user's (nW, N, N) mask (image-major windows: window w uses w % nW)."""
    if HAS_MASK:
        m = (w % n_mask_win).to(tl.int64) * m_sw + n * m_si
    else:
        m = n
    return m


@triton.jit
def _load_tok(ptr, img, off, d, inmap, ispad, pad_ptr, HD: tl.constexpr, HAS_PAD: tl.constexpr,
              G: tl.constexpr):
    """(rows, HD_PAD) block of one head's q, k or v; padding rows take the pad vector (or zeros)."""
    dmask = d < HD
    x = tl.load(_ptrs(ptr, img, off, d, G), mask=inmap[:, None] & dmask[None, :], other=0.0)
    if HAS_PAD:
        p = tl.load(pad_ptr + d, mask=dmask, other=0.0)
        x = tl.where(ispad[:, None], p[None, :].to(x.dtype), x)
    return x


@triton.jit
def _bias_block(
    h, rr, rc, bias_ptr, bias_st, bias_sh, N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROWS_ARE_KEYS: tl.constexpr,
):
    """bias[rel(query, key)] for tile rows rr x tile columns rc lying in the same window of the tile, 0 across
    windows (those pairs are selected away by :func:`_scores`); the scalar 0 without a bias. It depends
    only on the head and the positions inside the tile, so a program computes it once and reuses it for
    every tile it handles (the gather leaves the inner loop)."""
    if HAS_BIAS:
        gr = rr // N
        gc = rc // N
        # rel(q, k) = (rq - rk + WH - 1) (2 WW - 1) + cq - ck + WW - 1 = a(q) - a(k) + a0 with
        # a(n) = (n // WW) (2 WW - 1) + n % WW: per row and per column, so a pair costs one subtraction
        nr = rr - gr * N
        nc = rc - gc * N
        ar = ((nr // WW) * (2 * WW - 1) + nr % WW) * bias_st
        ac = ((nc // WW) * (2 * WW - 1) + nc % WW) * bias_st
        if ROWS_ARE_KEYS:
            off = ac[None, :] - ar[:, None]
        else:
            off = ar[:, None] - ac[None, :]
        base = bias_ptr + h * bias_sh + ((WH - 1) * (2 * WW - 1) + WW - 1) * bias_st
        b = tl.load(base + off, mask=gr[:, None] == gc[None, :], other=0.0)
        b = b.to(tl.float32) * LOG2E  # the kernels work on log2-scaled logits (see _scores)
    else:
        b = 0.0
    return b


@triton.jit
def _scores(
    a, b, bias_blk, same, lab_r, lab_c, mask_ptr, m_r, m_c, scale, SH: tl.constexpr, SW: tl.constexpr,
    LAYOUT: tl.constexpr, HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, IS_F32: tl.constexpr,
):
    """fp32 logits a b^T * scale + bias (+ the user's mask, or the shift mask from region labels) in log2
    units (times log2(e): ``exp2`` of them needs no multiply, and the bias block comes scaled from
    :func:`_bias_block`), -inf for pairs that must not interact (other window, padding rows of the tile). A
    select, not an addition: NaN + -inf would still be NaN. Rows are queries (a = q) or keys (a = k, the
    transposed logits)."""
    s = _dot(a, tl.trans(b), DOT_F32, IS_F32) * (scale * LOG2E) + bias_blk
    if HAS_MASK:
        s += tl.load(mask_ptr + m_r[:, None] + m_c[None, :], mask=same, other=0.0).to(tl.float32) * LOG2E
    if LAYOUT == 1 and (SH > 0 or SW > 0):
        s = tl.where(lab_r[:, None] != lab_c[None, :], s - 100.0 * LOG2E, s)
    return tl.where(same, s, float("-inf"))


# ----------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, pad_ptr, out_ptr, lse_ptr, flag_ptr,
    NW_TOT, n_win, n_ww, H, W, HP, WP, C, tiles_per_prog,
    s_b, s_h, s_y, s_x, o_sb, o_sy, o_sx, bias_st, bias_sh, m_sw, m_si, n_mask_win, scale,
    HEADS: tl.constexpr, N: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr, BM: tl.constexpr,
    BK: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, LAYOUT: tl.constexpr, ROLL_BEFORE_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PAD: tl.constexpr, DOT_F32: tl.constexpr,
    IS_F32: tl.constexpr, PRE_BIAS: tl.constexpr, SAFE: tl.constexpr,
):
    """Attention of one query block of a chunk of tiles for one head; writes out and the row lse.

    BK == TILE: all keys of the tile in one block (one softmax pass). BK < TILE (large windows, wide heads):
    the keys are walked in TILE // BK chunks with an online softmax, so K/V chunks, not the whole tile, sit
    in shared memory and registers."""
    tl.static_assert(BK == TILE or (BK * 4 == TILE and not PRE_BIAS))
    h = tl.program_id(0)  # heads fastest: the heads of a tile run together and share its qkv rows
    chunk = tl.program_id(1)
    prog = (chunk * HEADS + h) * tl.num_programs(2) + tl.program_id(2)
    tq = tl.program_id(2) * BM + tl.arange(0, BM)
    tk = tl.arange(0, BK)
    d = tl.arange(0, HD_PAD)
    hoff = h * s_h
    if PRE_BIAS:  # small tiles: the bias block stays in registers across the tile loop
        bias_pre = _bias_block(h, tq, tk, bias_ptr, bias_st, bias_sh, N, WH, WW, HAS_BIAS, False)
    sy, sx = _shifts(H, W, HP, WP, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
    b, wr, wc = _first_window(chunk * tiles_per_prog, n_win, n_ww, G, LAYOUT)
    for it in range(0, _tiles_to_do(flag_ptr, prog, chunk, tiles_per_prog, NW_TOT, G, SAFE)):
        tile = chunk * tiles_per_prog + it
        qw, qn, qvalid, qin, qimg, qoff, qoimg, qoo, qlab = _rows(
            tile, tq, b, wr, wc, NW_TOT, n_win, n_ww, H, W, HP, WP, sy, sx, s_b, s_y, s_x, o_sb, o_sy, o_sx,
            G, N, WH, WW, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
        q = _load_tok(q_ptr + hoff, qimg, qoff, d, qin, qvalid & ~qin, pad_ptr + h * HD, HD, HAS_PAD, G)
        m_r = _mask_rows(qw, qn, n_mask_win, m_sw, m_si, HAS_MASK)
        m = tl.full((BM,), float("-inf"), tl.float32)
        l = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, HD_PAD), tl.float32)
        for kc in range(0, TILE // BK):
            tkc = kc * BK + tk
            if PRE_BIAS:
                bias_blk = bias_pre
            else:
                bias_blk = _bias_block(h, tq, tkc, bias_ptr, bias_st, bias_sh, N, WH, WW, HAS_BIAS, False)
            kw, kn, kvalid, kin, kimg, koff, _, _, klab = _rows(
                tile, tkc, b, wr, wc, NW_TOT, n_win, n_ww, H, W, HP, WP, sy, sx, s_b, s_y, s_x, o_sb, o_sy,
                o_sx, G, N, WH, WW, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
            kpad = kvalid & ~kin
            k = _load_tok(k_ptr + hoff, kimg, koff, d, kin, kpad, pad_ptr + C + h * HD, HD, HAS_PAD, G)
            v = _load_tok(v_ptr + hoff, kimg, koff, d, kin, kpad, pad_ptr + 2 * C + h * HD, HD, HAS_PAD, G)
            if G > 1 and not SAFE:  # P @ V is the one product that can carry a NaN across windows
                _flag_nonfinite(flag_ptr, prog, tl.sum(v.to(tl.float32), 1))
            same = _same(qw, kw, qvalid, kvalid, G)
            s = _scores(q, k, bias_blk, same, qlab, klab, mask_ptr, m_r, kn, scale, SH, SW, LAYOUT, HAS_MASK,
                        DOT_F32, IS_F32)
            if BK == TILE:  # one pass: no rescaling
                m_new = tl.max(s, 1)
            else:
                m_new = tl.maximum(m, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # every logit so far -inf: p = 0
            p = tl.exp2(s - m_use[:, None])
            lp = p.to(v.dtype)
            if SAFE:  # another window's non-finite v must not reach this one (see _poison)
                v_ok = _finite(v)
                pv = _poison(_dot(lp, tl.where(v_ok, v, 0.0), DOT_F32, IS_F32), tq, tkc, ~v_ok, N, DOT_F32, IS_F32)
            else:
                pv = _dot(lp, v, DOT_F32, IS_F32)
            if BK == TILE:
                l = tl.sum(p, 1)
                acc = pv
            else:
                alpha = tl.exp2(m - m_use)
                l = l * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + pv
            m = m_new
        empty = l == 0.0  # output 0, lse +inf (2^(s - lse) = 0 in the backward: zero gradients)
        o = acc * (1.0 / tl.where(empty, 1.0, l))[:, None]  # one division per row, not per element
        tl.store(_ptrs(out_ptr + h * HD, qoimg, qoo, d, G), o.to(out_ptr.dtype.element_ty),
                 mask=qin[:, None] & (d < HD)[None, :])
        tl.store(_lse_ptrs(lse_ptr, qw, qn, h, HEADS, N, G), tl.where(empty, float("inf"), (m + tl.log2(l)) * LN2),
                 mask=qvalid)
        b, wr, wc = _next_window(b, wr, wc, n_win, n_ww, G, LAYOUT)


# ----------------------------------------------------------------------------------------- backward
# Gradient buffers: windows layout -> addressed like the output; map layout -> like the qkv map.
# Packed windows (G > 1), SAFE pass: dS is selected to its window, a NaN lse (a query whose logits hold a
# NaN) is read as +inf so that P is 0 off its window, and the operands of the dots are zeroed where not
# finite (see _poison). The first pass flags its programs whose gradients hold a non-finite value.


@triton.jit
def _bwd_fused_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, pad_ptr, out_ptr, dout_ptr, lse_ptr,
    dq_ptr, dk_ptr, dv_ptr, dbias_part_ptr, dpad_part_ptr, flag_ptr,
    NW_TOT, n_win, n_ww, H, W, HP, WP, C, tiles_per_prog,
    s_b, s_h, s_y, s_x, o_sb, o_sy, o_sx, bias_st, bias_sh, m_sw, m_si, n_mask_win, scale,
    HEADS: tl.constexpr, N: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr,
    HD: tl.constexpr, HD_PAD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr,
    SW: tl.constexpr, LAYOUT: tl.constexpr, ROLL_BEFORE_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_PAD: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_DPAD: tl.constexpr,
    DOT_F32: tl.constexpr, IS_F32: tl.constexpr, PRE_BIAS: tl.constexpr, SAFE: tl.constexpr,
):
    """dQ, dK, dV of whole tiles (one block of TILE rows) for a chunk of tiles and one head. Works on the
    transposed logits (keys as rows) so only dQ needs a transpose; sums dS over the chunk for dbias."""
    h = tl.program_id(0)  # heads fastest: the heads of a tile run together and share its qkv rows
    chunk = tl.program_id(1)
    prog = chunk * HEADS + h
    t = tl.arange(0, TILE)
    d = tl.arange(0, HD_PAD)
    dmask = (d < HD)[None, :]
    hoff = h * s_h
    if PRE_BIAS:  # small tiles: the bias block stays in registers across the tile loop
        bias_pre = _bias_block(h, t, t, bias_ptr, bias_st, bias_sh, N, WH, WW, HAS_BIAS, True)
    acc_dst = tl.zeros((TILE, TILE), dtype=tl.float32)  # acc_dst[j, i] = sum over windows of dS[i, j]
    pad_dk = tl.zeros((HD_PAD,), dtype=tl.float32)
    pad_dv = tl.zeros((HD_PAD,), dtype=tl.float32)
    sy, sx = _shifts(H, W, HP, WP, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
    b, wr, wc = _first_window(chunk * tiles_per_prog, n_win, n_ww, G, LAYOUT)
    for it in range(0, _tiles_to_do(flag_ptr, prog, chunk, tiles_per_prog, NW_TOT, G, SAFE)):
        tile = chunk * tiles_per_prog + it
        if PRE_BIAS:
            bias_t = bias_pre
        else:
            bias_t = _bias_block(h, t, t, bias_ptr, bias_st, bias_sh, N, WH, WW, HAS_BIAS, True)
        w, n, valid, inmap, img, off, oimg, ooff, lab = _rows(
            tile, t, b, wr, wc, NW_TOT, n_win, n_ww, H, W, HP, WP, sy, sx, s_b, s_y, s_x, o_sb, o_sy, o_sx,
            G, N, WH, WW, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
        ispad = valid & ~inmap
        q = _load_tok(q_ptr + hoff, img, off, d, inmap, ispad, pad_ptr + h * HD, HD, HAS_PAD, G)
        k = _load_tok(k_ptr + hoff, img, off, d, inmap, ispad, pad_ptr + C + h * HD, HD, HAS_PAD, G)
        v = _load_tok(v_ptr + hoff, img, off, d, inmap, ispad, pad_ptr + 2 * C + h * HD, HD, HAS_PAD, G)
        omask = inmap[:, None] & dmask
        do = tl.load(_ptrs(dout_ptr + h * HD, oimg, ooff, d, G), mask=omask, other=0.0)
        o = tl.load(_ptrs(out_ptr + h * HD, oimg, ooff, d, G), mask=omask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(_lse_ptrs(lse_ptr, w, n, h, HEADS, N, G), mask=valid, other=0.0)
        same = _same(w, w, valid, valid, G)
        m_c = _mask_rows(w, n, n_mask_win, m_sw, m_si, HAS_MASK)
        st = _scores(k, q, bias_t, same, lab, lab, mask_ptr, n, m_c, scale, SH, SW, LAYOUT, HAS_MASK,
                     DOT_F32, IS_F32)
        if SAFE:  # nothing non-finite may cross to another window (see _poison)
            lse_ok = lse == lse
            pt = tl.exp2(st - tl.where(lse_ok, lse * LOG2E, float("inf"))[None, :])
            q_ok, k_ok, do_ok = _finite(q), _finite(k), _finite(do)
            do = tl.where(do_ok, do, 0.0)  # delta above saw the original: a NaN there still poisons dS
            dv = _dot(pt.to(do.dtype), do, DOT_F32, IS_F32)
            dst = tl.where(same, pt * (_dot(v, tl.trans(do), DOT_F32, IS_F32) - delta[None, :]), 0.0)
            dst_lp = dst.to(q.dtype)
            dk = _dot(dst_lp, tl.where(q_ok, q, 0.0), DOT_F32, IS_F32) * scale
            dq = _dot(tl.trans(dst_lp), tl.where(k_ok, k, 0.0), DOT_F32, IS_F32) * scale
            dv = _poison(dv, t, t, ~(do_ok & lse_ok[:, None]), N, DOT_F32, IS_F32)  # NaN P row: all dV
            dk = _poison(dk, t, t, ~q_ok, N, DOT_F32, IS_F32)
            dq = _poison(dq, t, t, ~k_ok, N, DOT_F32, IS_F32)
        else:
            pt = tl.exp2(st - (lse * LOG2E)[None, :])
            dv = _dot(pt.to(do.dtype), do, DOT_F32, IS_F32)
            dpt = _dot(v, tl.trans(do), DOT_F32, IS_F32)
            dst = pt * (dpt - delta[None, :])
            dst_lp = dst.to(q.dtype)
            dk = _dot(dst_lp, q, DOT_F32, IS_F32) * scale
            dq = _dot(tl.trans(dst_lp), k, DOT_F32, IS_F32) * scale
        gimg = oimg if LAYOUT == 0 else img
        g = ooff if LAYOUT == 0 else off
        tl.store(_ptrs(dq_ptr + h * HD, gimg, g, d, G), dq.to(dq_ptr.dtype.element_ty), mask=omask)
        tl.store(_ptrs(dk_ptr + h * HD, gimg, g, d, G), dk.to(dk_ptr.dtype.element_ty), mask=omask)
        tl.store(_ptrs(dv_ptr + h * HD, gimg, g, d, G), dv.to(dv_ptr.dtype.element_ty), mask=omask)
        if G > 1 and not SAFE:
            _flag_nonfinite(flag_ptr, prog, tl.sum(dq, 1) + tl.sum(dk, 1) + tl.sum(dv, 1))
        if NEED_DBIAS:
            acc_dst += dst
        if NEED_DPAD:
            pad_dk += tl.sum(tl.where(ispad[:, None], dk, 0.0), 0)
            pad_dv += tl.sum(tl.where(ispad[:, None], dv, 0.0), 0)
        b, wr, wc = _next_window(b, wr, wc, n_win, n_ww, G, LAYOUT)
    redo = _redone(flag_ptr, prog, SAFE)
    if NEED_DBIAS:
        tl.store(dbias_part_ptr + (prog.to(tl.int64) * TILE + t[None, :]) * TILE + t[:, None], acc_dst, mask=redo)
    if NEED_DPAD:
        tl.store(dpad_part_ptr + prog * 2 * HD_PAD + d, pad_dk, mask=redo)
        tl.store(dpad_part_ptr + prog * 2 * HD_PAD + HD_PAD + d, pad_dv, mask=redo)


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, pad_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr,
    dq_ptr, dbias_part_ptr, flag_ptr,
    NW_TOT, n_win, n_ww, H, W, HP, WP, C, tiles_per_prog,
    s_b, s_h, s_y, s_x, o_sb, o_sy, o_sx, bias_st, bias_sh, m_sw, m_si, n_mask_win, scale,
    HEADS: tl.constexpr, N: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr, BM: tl.constexpr,
    BK: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, LAYOUT: tl.constexpr, ROLL_BEFORE_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PAD: tl.constexpr, NEED_DBIAS: tl.constexpr,
    DOT_F32: tl.constexpr, IS_F32: tl.constexpr, PRE_BIAS: tl.constexpr, SAFE: tl.constexpr,
):
    """Split backward, part 1: dQ of one query block against all keys of the tile; stores delta =
    rowsum(dO * O) for part 2 and sums dS over the chunk for dbias.

    BK == TILE: all keys in one block. BK == TILE // 4: the keys are walked in 4 chunks; the dS sums of
    the 4 key chunks live in 4 accumulators that rotate by one slot per chunk, so after each tile every
    chunk's sum is back in its own slot (registers cannot be indexed by a loop counter)."""
    tl.static_assert(BK == TILE or (BK * 4 == TILE and not PRE_BIAS))
    h = tl.program_id(0)  # heads fastest: the heads of a tile run together and share its qkv rows
    chunk = tl.program_id(1)
    prog = (chunk * HEADS + h) * tl.num_programs(2) + tl.program_id(2)
    tq = tl.program_id(2) * BM + tl.arange(0, BM)
    tk = tl.arange(0, BK)
    d = tl.arange(0, HD_PAD)
    dmask = (d < HD)[None, :]
    hoff = h * s_h
    if PRE_BIAS:  # small tiles: the bias block stays in registers across the tile loop
        bias_pre = _bias_block(h, tq, tk, bias_ptr, bias_st, bias_sh, N, WH, WW, HAS_BIAS, False)
    acc0 = tl.zeros((BM, BK), dtype=tl.float32)
    acc1 = tl.zeros((BM, BK), dtype=tl.float32)
    acc2 = tl.zeros((BM, BK), dtype=tl.float32)
    acc3 = tl.zeros((BM, BK), dtype=tl.float32)
    sy, sx = _shifts(H, W, HP, WP, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
    b, wr, wc = _first_window(chunk * tiles_per_prog, n_win, n_ww, G, LAYOUT)
    for it in range(0, _tiles_to_do(flag_ptr, prog, chunk, tiles_per_prog, NW_TOT, G, SAFE)):
        tile = chunk * tiles_per_prog + it
        qw, qn, qvalid, qin, qimg, qoff, qoimg, qoo, qlab = _rows(
            tile, tq, b, wr, wc, NW_TOT, n_win, n_ww, H, W, HP, WP, sy, sx, s_b, s_y, s_x, o_sb, o_sy, o_sx,
            G, N, WH, WW, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
        q = _load_tok(q_ptr + hoff, qimg, qoff, d, qin, qvalid & ~qin, pad_ptr + h * HD, HD, HAS_PAD, G)
        omask = qin[:, None] & dmask
        do = tl.load(_ptrs(dout_ptr + h * HD, qoimg, qoo, d, G), mask=omask, other=0.0)
        o = tl.load(_ptrs(out_ptr + h * HD, qoimg, qoo, d, G), mask=omask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(_lse_ptrs(lse_ptr, qw, qn, h, HEADS, N, G), mask=qvalid, other=0.0)
        m_r = _mask_rows(qw, qn, n_mask_win, m_sw, m_si, HAS_MASK)
        dq = tl.zeros((BM, HD_PAD), dtype=tl.float32)
        for kc in range(0, TILE // BK):
            tkc = kc * BK + tk
            if PRE_BIAS:
                bias_blk = bias_pre
            else:
                bias_blk = _bias_block(h, tq, tkc, bias_ptr, bias_st, bias_sh, N, WH, WW, HAS_BIAS, False)
            kw, kn, kvalid, kin, kimg, koff, _, _, klab = _rows(
                tile, tkc, b, wr, wc, NW_TOT, n_win, n_ww, H, W, HP, WP, sy, sx, s_b, s_y, s_x, o_sb, o_sy,
                o_sx, G, N, WH, WW, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
            kpad = kvalid & ~kin
            k = _load_tok(k_ptr + hoff, kimg, koff, d, kin, kpad, pad_ptr + C + h * HD, HD, HAS_PAD, G)
            v = _load_tok(v_ptr + hoff, kimg, koff, d, kin, kpad, pad_ptr + 2 * C + h * HD, HD, HAS_PAD, G)
            same = _same(qw, kw, qvalid, kvalid, G)
            s = _scores(q, k, bias_blk, same, qlab, klab, mask_ptr, m_r, kn, scale, SH, SW, LAYOUT, HAS_MASK,
                        DOT_F32, IS_F32)
            p = tl.exp2(s - (lse * LOG2E)[:, None])
            dp = _dot(do, tl.trans(v), DOT_F32, IS_F32)
            ds = p * (dp - delta[:, None])
            if SAFE:  # see _bwd_fused_kernel
                ds = tl.where(same, ds, 0.0)
                k_ok = _finite(k)
                dq += _poison(_dot(ds.to(k.dtype), tl.where(k_ok, k, 0.0), DOT_F32, IS_F32), tq, tkc, ~k_ok, N,
                              DOT_F32, IS_F32)
            else:
                dq += _dot(ds.to(k.dtype), k, DOT_F32, IS_F32)
            if NEED_DBIAS:
                if BK == TILE:
                    acc0 += ds
                else:  # rotate: the slot of chunk kc is acc0 now, and acc3 after the shift
                    acc0, acc1, acc2, acc3 = acc1, acc2, acc3, acc0 + ds
        dq = dq * scale
        gimg = qoimg if LAYOUT == 0 else qimg
        g = qoo if LAYOUT == 0 else qoff
        tl.store(_ptrs(dq_ptr + h * HD, gimg, g, d, G), dq.to(dq_ptr.dtype.element_ty), mask=omask)
        tl.store(_lse_ptrs(delta_ptr, qw, qn, h, HEADS, N, G), delta, mask=qvalid)
        if G > 1 and not SAFE:
            _flag_nonfinite(flag_ptr, prog, tl.sum(dq, 1))
        b, wr, wc = _next_window(b, wr, wc, n_win, n_ww, G, LAYOUT)
    if NEED_DBIAS:
        part = chunk * HEADS + h
        redo = _redone(flag_ptr, prog, SAFE)
        base = dbias_part_ptr + (part.to(tl.int64) * TILE + tq[:, None]) * TILE + tk[None, :]
        tl.store(base, acc0, mask=redo)
        if BK < TILE:
            tl.store(base + BK, acc1, mask=redo)
            tl.store(base + 2 * BK, acc2, mask=redo)
            tl.store(base + 3 * BK, acc3, mask=redo)


@triton.jit
def _bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, pad_ptr, dout_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dpad_part_ptr, flag_ptr,
    NW_TOT, n_win, n_ww, H, W, HP, WP, C, tiles_per_prog,
    s_b, s_h, s_y, s_x, o_sb, o_sy, o_sx, bias_st, bias_sh, m_sw, m_si, n_mask_win, scale,
    HEADS: tl.constexpr, N: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr, BN: tl.constexpr,
    BQ: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, LAYOUT: tl.constexpr, ROLL_BEFORE_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PAD: tl.constexpr, NEED_DPAD: tl.constexpr,
    DOT_F32: tl.constexpr, IS_F32: tl.constexpr, PRE_BIAS: tl.constexpr, SAFE: tl.constexpr,
):
    """Split backward, part 2: dK, dV of one key block against all queries of the tile (transposed),
    the queries walked in TILE // BQ chunks (one chunk when BQ == TILE)."""
    tl.static_assert(BQ == TILE or (BQ * 4 == TILE and not PRE_BIAS))
    h = tl.program_id(0)  # heads fastest: the heads of a tile run together and share its qkv rows
    chunk = tl.program_id(1)
    kb = tl.program_id(2)
    prog = (chunk * HEADS + h) * tl.num_programs(2) + kb
    tk = kb * BN + tl.arange(0, BN)
    tq = tl.arange(0, BQ)
    d = tl.arange(0, HD_PAD)
    dmask = (d < HD)[None, :]
    hoff = h * s_h
    if PRE_BIAS:  # small tiles: the bias block stays in registers across the tile loop
        bias_pre = _bias_block(h, tk, tq, bias_ptr, bias_st, bias_sh, N, WH, WW, HAS_BIAS, True)
    pad_dk = tl.zeros((HD_PAD,), dtype=tl.float32)
    pad_dv = tl.zeros((HD_PAD,), dtype=tl.float32)
    sy, sx = _shifts(H, W, HP, WP, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
    b, wr, wc = _first_window(chunk * tiles_per_prog, n_win, n_ww, G, LAYOUT)
    for it in range(0, _tiles_to_do(flag_ptr, prog, chunk, tiles_per_prog, NW_TOT, G, SAFE)):
        tile = chunk * tiles_per_prog + it
        kw, kn, kvalid, kin, kimg, koff, koimg, koo, klab = _rows(
            tile, tk, b, wr, wc, NW_TOT, n_win, n_ww, H, W, HP, WP, sy, sx, s_b, s_y, s_x, o_sb, o_sy, o_sx,
            G, N, WH, WW, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
        kpad = kvalid & ~kin
        k = _load_tok(k_ptr + hoff, kimg, koff, d, kin, kpad, pad_ptr + C + h * HD, HD, HAS_PAD, G)
        v = _load_tok(v_ptr + hoff, kimg, koff, d, kin, kpad, pad_ptr + 2 * C + h * HD, HD, HAS_PAD, G)
        dk = tl.zeros((BN, HD_PAD), dtype=tl.float32)
        dv = tl.zeros((BN, HD_PAD), dtype=tl.float32)
        for qc in range(0, TILE // BQ):
            tqc = qc * BQ + tq
            if PRE_BIAS:
                bias_t = bias_pre
            else:
                bias_t = _bias_block(h, tk, tqc, bias_ptr, bias_st, bias_sh, N, WH, WW, HAS_BIAS, True)
            qw, qn, qvalid, qin, qimg, qoff, qoimg, qoo, qlab = _rows(
                tile, tqc, b, wr, wc, NW_TOT, n_win, n_ww, H, W, HP, WP, sy, sx, s_b, s_y, s_x, o_sb, o_sy,
                o_sx, G, N, WH, WW, SH, SW, LAYOUT, ROLL_BEFORE_PAD)
            q = _load_tok(q_ptr + hoff, qimg, qoff, d, qin, qvalid & ~qin, pad_ptr + h * HD, HD, HAS_PAD, G)
            do = tl.load(_ptrs(dout_ptr + h * HD, qoimg, qoo, d, G), mask=qin[:, None] & dmask, other=0.0)
            lse = tl.load(_lse_ptrs(lse_ptr, qw, qn, h, HEADS, N, G), mask=qvalid, other=0.0)
            delta = tl.load(_lse_ptrs(delta_ptr, qw, qn, h, HEADS, N, G), mask=qvalid, other=0.0)
            same = _same(kw, qw, kvalid, qvalid, G)
            m_c = _mask_rows(qw, qn, n_mask_win, m_sw, m_si, HAS_MASK)
            st = _scores(k, q, bias_t, same, klab, qlab, mask_ptr, kn, m_c, scale, SH, SW, LAYOUT, HAS_MASK,
                         DOT_F32, IS_F32)
            if SAFE:  # see _bwd_fused_kernel
                lse_ok = lse == lse
                pt = tl.exp2(st - tl.where(lse_ok, lse * LOG2E, float("inf"))[None, :])
                q_ok, do_ok = _finite(q), _finite(do)
                do = tl.where(do_ok, do, 0.0)
                dst = tl.where(same, pt * (_dot(v, tl.trans(do), DOT_F32, IS_F32) - delta[None, :]), 0.0)
                dv += _poison(_dot(pt.to(do.dtype), do, DOT_F32, IS_F32), tk, tqc, ~(do_ok & lse_ok[:, None]), N,
                              DOT_F32, IS_F32)
                dk += _poison(_dot(dst.to(q.dtype), tl.where(q_ok, q, 0.0), DOT_F32, IS_F32), tk, tqc, ~q_ok, N,
                              DOT_F32, IS_F32)
            else:
                pt = tl.exp2(st - (lse * LOG2E)[None, :])
                dv += _dot(pt.to(do.dtype), do, DOT_F32, IS_F32)
                dpt = _dot(v, tl.trans(do), DOT_F32, IS_F32)
                dst = pt * (dpt - delta[None, :])
                dk += _dot(dst.to(q.dtype), q, DOT_F32, IS_F32)
        dk = dk * scale
        gimg = koimg if LAYOUT == 0 else kimg
        g = koo if LAYOUT == 0 else koff
        kmask = kin[:, None] & dmask
        tl.store(_ptrs(dk_ptr + h * HD, gimg, g, d, G), dk.to(dk_ptr.dtype.element_ty), mask=kmask)
        tl.store(_ptrs(dv_ptr + h * HD, gimg, g, d, G), dv.to(dv_ptr.dtype.element_ty), mask=kmask)
        if G > 1 and not SAFE:
            _flag_nonfinite(flag_ptr, prog, tl.sum(dk, 1) + tl.sum(dv, 1))
        if NEED_DPAD:
            pad_dk += tl.sum(tl.where(kpad[:, None], dk, 0.0), 0)
            pad_dv += tl.sum(tl.where(kpad[:, None], dv, 0.0), 0)
        b, wr, wc = _next_window(b, wr, wc, n_win, n_ww, G, LAYOUT)
    if NEED_DPAD:
        redo = _redone(flag_ptr, prog, SAFE)
        tl.store(dpad_part_ptr + prog * 2 * HD_PAD + d, pad_dk, mask=redo)
        tl.store(dpad_part_ptr + prog * 2 * HD_PAD + HD_PAD + d, pad_dv, mask=redo)


# ----------------------------------------------------------------------------------------- launchers


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@functools.cache
def tile_config(window: tuple[int, int], head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tile geometry for a window: tokens N, windows per tile G, TILE, block sizes, fused backward or not.

    Resources were read statically from cubins compiled for sm_90 at realistic launch shapes (B=128 on a
    132-SM grid, ``python -m esvit_kernels._triton.aot``; docs/kernel_notes.md has the tables):

    * TILE 64 (windows up to 8x8): the whole tile in one block, several small windows packed per tile; in
      half precision on 4 warps (one warpgroup), 2-3 programs per SM.
    * TILE >= 128 (windows 9x9 to 16x16) in fp16/bf16 at head_dim <= 64: the forward and dK/dV take 64-row
      blocks (4 warps) against 4 chunks of TILE // 4 keys (queries); dQ takes 16-row query blocks against
      the whole tile (8 warps); head dims below 32 are padded to 32 (at 16 the compiler spills 3-4 KB per
      thread in the backward).
    * TILE >= 128 in fp32 or at head_dim 128, and fp32 at head_dim > 32: the keys (forward, dQ) and queries
      (dK/dV) are walked in 4 chunks of TILE // 4. Whole, these tiles spill (72 B at head_dim 128 in bf16,
      up to 4 KB in fp32) and, double-buffered at head_dim 128 in fp32, need ~300 KB, more than a Hopper
      block has; in chunks they need 11-53 KB and 80-128 registers with no spills.

    Block sizes and warps are not yet tuned on a GPU. :func:`launch_candidates` lists the fallback (one
    pipeline stage) tried when a configuration does not fit the device's shared memory.
    """
    n = window[0] * window[1]
    tile = max(16, _next_pow2(n))
    if tile < 64:  # small windows: pack several whole windows into one 64-row tile
        tile = 64
    g = tile // n if 2 * n <= tile else 1
    hd_pad = max(16 if tile <= 64 else 32, _next_pow2(head_dim))
    # fp32 takes exact (FMA) dots, register- and shared-memory-hungry, and head dims > 32 hold too many
    # operands for the fused backward: those use the split backward with small blocks
    fused = tile <= 64 and dtype != torch.float32 and hd_pad <= 32
    small = tile if fused else 16
    # walk keys / queries in 4 chunks where a whole tile does not fit registers and shared memory: large
    # tiles in fp32 or at head_dim > 64, and fp32 at head_dim > 32 (whole 64-row fp32 tiles at head_dim 128
    # spill up to 4 KB per thread in the backward; in chunks of 16: <= 8 B).
    fp32 = dtype == torch.float32
    whole64 = tile <= 64 and not fp32  # the forward takes the whole 64-row tile as one query block
    chunked = (tile >= 128 and (fp32 or hd_pad >= 128)) or (fp32 and hd_pad >= 64)
    chunk = tile // 4 if chunked else tile
    # large half-precision tiles at head_dim <= 64 (Swin W12/W14), chosen from the bytes: a 16-row query
    # block re-reads the whole K/V tile (16 x per tile) and, being less than one warpgroup's M = 64, is
    # computed by every warp alike (the logits of chained dots are laid out along M). The forward and dK/dV
    # take 64-row blocks (one warpgroup, 4 warps) against 4 chunks of TILE / 4 keys (queries): 4 x per tile,
    # no duplicated warps. dQ keeps 16-row blocks against the whole tile: its per-program dbias sums
    # (BM x TILE fp32) at 64 rows need 128 registers per thread and spill.
    big_half = tile >= 128 and not fp32 and hd_pad <= 64
    return {
        "N": n, "G": g, "TILE": tile, "FUSED": fused,
        "BM_FWD": tile if whole64 else 64 if big_half else 16,
        "BM_BWD": small, "BN_BWD": 64 if big_half else small,
        "BK_FWD": tile // 4 if big_half else chunk, "BK_BWD": chunk, "BQ_BWD": tile // 4 if big_half else chunk,
        "PRE_BIAS": tile <= 64 and not chunked,  # the bias block of the whole tile, kept in registers
        "HD_PAD": hd_pad,
        # a whole 64-row half-precision tile is one warpgroup's MMA (M = 64): 4 warps. With 8, Triton lays
        # the logits of chained dots out along M over both warpgroups (warpsPerCTA [8, 1]), so both compute
        # the same 64 x 64 block: twice the softmax work and registers (issue 14; static, sm_90, Swin-T
        # stage 1: 4 warps = 620 / 733 loop instructions per warp, 145 / 254 registers, 3 / 2 programs per
        # SM for the forward / fused backward, against 586 / 638 per warp x 8 warps, 1 program for the
        # backward at 8). Other tiles keep 8 warps.
        "WARPS": 4 if whole64 or big_half else 8,
        "WARPS_BWD": 4 if fused else 8,  # dQ and the fused backward
        "WARPS_DKV": 4 if big_half else 8,
        # software pipelining depth: 2 (the next tile's loads in flight), but 1 for the fused backward
        # (at 4 warps and 2 stages it needs 255 registers and spills 40 B at Swin-T stage 1, 64 B with a
        # mask; at 1 stage 254 registers, no spills) and for the 64-row blocks of large tiles (2 stages
        # spill 40-336 B there)
        "STAGES": 1 if big_half else 2,
        "STAGES_BWD": 1 if fused else 2,
        "STAGES_DKV": 1 if big_half else 2,
    }


def launch_candidates(cfg: dict, kernel: str) -> list[dict]:
    """Launch options of one kernel (``fwd``, ``fused``, ``dq``, ``dkv``) in order of preference: the
    configuration of :func:`tile_config`, then one pipeline stage (K/V not double-buffered).
    :func:`.aot.launch` runs the first whose shared memory fits the device."""
    stages = {"fwd": cfg["STAGES"], "dkv": cfg["STAGES_DKV"]}.get(kernel, cfg["STAGES_BWD"])
    chunk = {"fwd": {"BK": cfg["BK_FWD"]}, "dq": {"BK": cfg["BK_BWD"]}, "dkv": {"BQ": cfg["BQ_BWD"]}}.get(kernel, {})
    out = [{"num_stages": stages, **chunk}]
    if stages > 1:
        out.append({"num_stages": 1, **chunk})
    return out


def _num_chunks(n_tiles: int, programs_per_chunk: int, device: torch.device, waves: int) -> int:
    """How many chunks of tiles: about ``waves`` programs per SM on a GPU, each looping over its tiles
    (so the per-program bias block and dbias sum are amortised); 4 on the CPU interpreter."""
    sms = aot.sm_count(device)
    target = waves * sms if sms else 4
    return max(1, min(n_tiles, -(-target // programs_per_chunk)))


def _chunking(n_tiles: int, programs_per_chunk: int, device: torch.device, waves: int) -> tuple[int, int]:
    chunks = _num_chunks(n_tiles, programs_per_chunk, device, waves)
    tpp = -(-n_tiles // chunks)
    return -(-n_tiles // tpp), tpp


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
    idx = torch.full((t_entries, int(counts.max())), tile * tile, dtype=torch.long)
    start = torch.cumsum(counts, 0) - counts
    idx[rel, torch.arange(rel.numel()) - start[rel]] = pos
    return idx.to(device_str)


def _reduce_dbias(part: torch.Tensor, window, g: int, tile: int) -> torch.Tensor:
    """(chunks, heads, TILE, TILE) per-program dS sums -> (T, heads) table gradient, deterministic."""
    heads = part.shape[1]
    flat = part.sum(0).reshape(heads, tile * tile)
    flat = torch.cat([flat, flat.new_zeros(heads, 1)], 1)
    idx = _bias_gather_index(tuple(window), g, tile, str(part.device))
    return flat[:, idx].sum(-1).t().contiguous()


def _bias_args(bias_table, dummy):
    if bias_table is None:
        return dummy, 0, 0
    return bias_table, bias_table.stride(0), bias_table.stride(1)


@dataclass
class _Problem:
    """Everything the kernels need to address one call: layout, geometry, strides, optional tensors."""

    layout: int  # 0 = windows, 1 = map
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: int
    hd: int
    window: tuple[int, int]
    shift: tuple[int, int]
    scale: float
    nw_tot: int
    geo: tuple  # n_win, n_ww, H, W, HP, WP, C
    in_strides: tuple  # s_b, s_h, s_y, s_x
    out_strides: tuple  # o_sb, o_sy, o_sx
    bias_table: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    pad: torch.Tensor | None = None
    roll_before_pad: bool = False

    @property
    def cfg(self) -> dict:
        return tile_config(tuple(self.window), self.hd, self.q.dtype)

    @property
    def n_tiles(self) -> int:
        return -(-self.nw_tot // self.cfg["G"])

    def args(self, tiles_per_prog: int) -> tuple:
        bias, bst, bsh = _bias_args(self.bias_table, self.q)
        m = self.mask
        m_args = (m.stride(0), m.stride(1), m.shape[0]) if m is not None else (0, 0, 1)
        return (self.nw_tot, *self.geo, tiles_per_prog, *self.in_strides, *self.out_strides, bst, bsh, *m_args,
                self.scale)

    def ptrs(self) -> tuple:
        q = self.q
        return (q, self.k, self.v, _bias_args(self.bias_table, q)[0], self.mask if self.mask is not None else q,
                self.pad if self.pad is not None else q)

    def consts(self, **extra) -> dict:
        cfg = self.cfg
        return dict(
            HEADS=self.heads, N=cfg["N"], G=cfg["G"], TILE=cfg["TILE"], HD=self.hd, HD_PAD=cfg["HD_PAD"],
            WH=self.window[0], WW=self.window[1], SH=self.shift[0], SW=self.shift[1], LAYOUT=self.layout,
            ROLL_BEFORE_PAD=bool(self.roll_before_pad), HAS_BIAS=self.bias_table is not None,
            HAS_MASK=self.mask is not None, HAS_PAD=self.pad is not None,
            DOT_F32=triton_interpreting() and self.q.dtype == torch.bfloat16,
            IS_F32=self.q.dtype == torch.float32, PRE_BIAS=cfg["PRE_BIAS"], **extra,
        )


def _launch_passes(kernel, grid: tuple, ptrs: tuple, pb: _Problem, tiles_per_prog: int,
                   candidates: list[dict], **consts) -> None:
    """One launch with one window per tile. With packed windows (G > 1) two: the plain kernel, which flags
    its programs whose results hold a non-finite value, then the SAFE pass, which redoes only those (see
    the module docstring); a program the first pass did not flag exits at once. Each launch runs on the
    tensors' device with the first of ``candidates`` that fits its shared memory."""
    args = pb.args(tiles_per_prog)
    with _on_device(pb.q):
        if pb.cfg["G"] == 1:  # the flag pointer is unused
            launch(kernel, grid, *ptrs, ptrs[0], *args, SAFE=False, candidates=candidates, **consts)
            return
        flags = torch.zeros(math.prod(grid), dtype=torch.int32, device=pb.q.device)
        launch(kernel, grid, *ptrs, flags, *args, SAFE=False, candidates=candidates, **consts)
        launch(kernel, grid, *ptrs, flags, *args, SAFE=True, candidates=candidates, **dict(consts, PRE_BIAS=False))


def _forward(pb: _Problem, out: torch.Tensor, lse: torch.Tensor) -> None:
    if pb.n_tiles == 0:  # no windows (a batch of 0 images): nothing to compute
        return
    cfg = pb.cfg
    nq = cfg["TILE"] // cfg["BM_FWD"]
    chunks, tpp = _chunking(pb.n_tiles, pb.heads * nq, pb.q.device, waves=8)
    _launch_passes(_fwd_kernel, (pb.heads, chunks, nq), (*pb.ptrs(), out, lse), pb, tpp,
                   launch_candidates(cfg, "fwd"), BM=cfg["BM_FWD"], num_warps=cfg["WARPS"], **pb.consts())


def _backward(pb: _Problem, out, dout, lse, dq, dk, dv, need_dbias: bool, need_dpad: bool):
    """Returns (dbias (T, heads) fp32 or empty, (heads, 2, hd) dK/dV sums over padding tokens or None)."""
    cfg = pb.cfg
    dev, f32 = pb.q.device, torch.float32
    need_dbias = need_dbias and pb.bias_table is not None
    need_dpad = need_dpad and pb.pad is not None
    if pb.n_tiles == 0:  # no windows: the table and pad gradients are sums over nothing
        dbias = pb.bias_table.new_zeros(pb.bias_table.shape, dtype=f32) if need_dbias else lse.new_empty(0)
        return dbias, pb.pad.new_zeros(pb.heads, 2, pb.hd, dtype=f32) if need_dpad else None
    nq = 1 if cfg["FUSED"] else cfg["TILE"] // cfg["BM_BWD"]
    nk = 1 if cfg["FUSED"] else cfg["TILE"] // cfg["BN_BWD"]
    chunks, tpp = _chunking(pb.n_tiles, pb.heads * max(nq, nk), dev, waves=2)
    tile = cfg["TILE"]
    dbias_part = torch.empty(chunks, pb.heads, tile, tile, device=dev, dtype=f32) if need_dbias else lse
    dpad_part = torch.empty(chunks * pb.heads * nk, 2, cfg["HD_PAD"], device=dev, dtype=f32) if need_dpad else lse
    warps = cfg["WARPS_BWD"]
    if cfg["FUSED"] and (pb.pad is not None or pb.mask is not None):
        # a padding vector or a user mask adds live values: at 4 warps the fused backward spills 32-72 B
        # (static, sm_90, several tiles per program), at 8 it does not
        warps = 8
    consts = pb.consts(NEED_DPAD=need_dpad, num_warps=warps)
    if cfg["FUSED"]:
        _launch_passes(_bwd_fused_kernel, (pb.heads, chunks), (*pb.ptrs(), out, dout, lse, dq, dk, dv, dbias_part,
                       dpad_part), pb, tpp, launch_candidates(cfg, "fused"), NEED_DBIAS=need_dbias, **consts)
    else:
        delta = torch.empty_like(lse)
        consts.pop("NEED_DPAD")
        _launch_passes(_bwd_dq_kernel, (pb.heads, chunks, nq), (*pb.ptrs(), out, dout, lse, delta, dq, dbias_part),
                       pb, tpp, launch_candidates(cfg, "dq"), BM=cfg["BM_BWD"], NEED_DBIAS=need_dbias, **consts)
        _launch_passes(_bwd_dkv_kernel, (pb.heads, chunks, nk), (*pb.ptrs(), dout, lse, delta, dk, dv, dpad_part),
                       pb, tpp, launch_candidates(cfg, "dkv"), BN=cfg["BN_BWD"], NEED_DPAD=need_dpad,
                       **dict(consts, num_warps=cfg["WARPS_DKV"]))
    dbias = _reduce_dbias(dbias_part, pb.window, cfg["G"], tile) if need_dbias else lse.new_empty(0)
    dpad = (dpad_part.view(chunks, pb.heads, nk, 2, cfg["HD_PAD"]).sum((0, 2))[..., :pb.hd]
            if need_dpad else None)
    return dbias, dpad


def _on_device(x: torch.Tensor):
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _check_offsets(*tensors: torch.Tensor) -> None:
    """The kernels address a row inside one image (map layout) or one window (windows layout) with int32
    offsets and add the image's or window's base in int64: each tensor's extent past its first dimension
    must stay below 2^31 elements (a batch may be as large as memory allows)."""
    for t in tensors:
        extent = sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:])) + 1
        if extent >= 2**31:
            raise ValueError(f"one sample of a {tuple(t.shape)} tensor spans {extent} elements: the Triton window "
                             "attention kernels address inside a sample with int32 offsets (< 2^31)")


def _map_problem(qkv, bias_table, pad_qkv, num_heads, window, shift, scale, roll_before_pad, out) -> _Problem:
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    _check_offsets(qkv, out)
    wh, ww = window
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    n_ww = wp // ww
    n_win = (hp // wh) * n_ww
    return _Problem(
        layout=1, q=qkv, k=qkv[..., c:], v=qkv[..., 2 * c:], heads=num_heads, hd=c // num_heads,
        window=tuple(window), shift=tuple(shift), scale=scale, nw_tot=b * n_win,
        geo=(n_win, n_ww, h, w, hp, wp, c), in_strides=(qkv.stride(0), c // num_heads, qkv.stride(1), qkv.stride(2)),
        out_strides=(out.stride(0), out.stride(1), out.stride(2)), bias_table=bias_table, pad=pad_qkv,
        roll_before_pad=roll_before_pad,
    )


def swa_forward(qkv, bias_table, pad_qkv, num_heads, window, shift, scale, roll_before_pad):
    """Map layout forward: (out (B, H, W, C), lse (B*nW, heads, N) fp32)."""
    out = qkv.new_empty(*qkv.shape[:3], qkv.shape[3] // 3)
    pb = _map_problem(qkv, bias_table, pad_qkv, num_heads, window, shift, scale, roll_before_pad, out)
    lse = qkv.new_empty(pb.nw_tot, num_heads, pb.cfg["N"], dtype=torch.float32)
    _forward(pb, out, lse)
    return out, lse


def swa_backward(dout, qkv, out, lse, bias_table, pad_qkv, num_heads, window, shift, scale, roll_before_pad,
                 need_dbias, need_dpad):
    """Map layout backward: (dqkv like qkv, dbias (T, heads) fp32 or empty, dpad (3C,) fp32 or empty)."""
    pb = _map_problem(qkv, bias_table, pad_qkv, num_heads, window, shift, scale, roll_before_pad, out)
    c = pb.geo[-1]
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    dbias, dpad_kv = _backward(pb, out, dout, lse, dqkv, dqkv[..., c:], dqkv[..., 2 * c:], need_dbias, need_dpad)
    dpad = qkv.new_empty(0, dtype=torch.float32)
    if dpad_kv is not None:  # the q part stays zero: padded outputs are discarded, so their dQ is 0
        dpad = torch.cat([torch.zeros_like(dpad_kv[:, 0]).reshape(-1), dpad_kv[:, 0].reshape(-1),
                          dpad_kv[:, 1].reshape(-1)])
    return dqkv, dbias, dpad


def _windows_problem(q, k, v, bias_table, mask, window, scale, out) -> _Problem:
    if not (q.stride() == k.stride() == v.stride()):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bw, heads, _, hd = q.shape
    _check_offsets(q, k, v, out)
    return _Problem(
        layout=0, q=q, k=k, v=v, heads=heads, hd=hd, window=tuple(window), shift=(0, 0), scale=scale, nw_tot=bw,
        geo=(1, 1, 0, 0, 0, 0, 0), in_strides=(q.stride(0), q.stride(1), q.stride(2), 0),
        out_strides=(out.stride(0), out.stride(2), 0), bias_table=bias_table, mask=mask,
    )


def _windows_buffer(like: torch.Tensor) -> torch.Tensor:
    bw, heads, n, hd = like.shape
    return like.new_empty(bw, n, heads, hd).transpose(1, 2)


def wa_forward(q, k, v, bias_table, mask, window, scale):
    """Windows layout forward: (out (BW, heads, N, hd) as a view of (BW, N, heads, hd), lse)."""
    out = _windows_buffer(q)
    pb = _windows_problem(q, k, v, bias_table, mask, window, scale, out)
    lse = q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32)
    _forward(pb, out, lse)
    return out, lse


def wa_backward(dout, q, k, v, out, lse, bias_table, mask, window, scale, need_dbias):
    """Windows layout backward: (dq, dk, dv laid out like out, dbias (T, heads) fp32 or empty)."""
    if dout.stride() != out.stride():  # the kernels address dout through the output buffer's strides
        dout = dout.transpose(1, 2).contiguous().transpose(1, 2)
    pb = _windows_problem(q, k, v, bias_table, mask, window, scale, out)
    grads = [_windows_buffer(q) for _ in range(3)]
    dbias, _ = _backward(pb, out, dout, lse, *grads, need_dbias, False)
    return (*grads, dbias)


# ----------------------------------------------------------------------------------------- AOT cases


def launch_counts(rec: aot.Launch) -> aot.LaunchCounts | None:
    """Bytes at the floor, hot-loop iterations and dot FLOPs of one recorded launch (for ``aot --model``).
    None for a SAFE pass, which does no work unless the first pass saw a non-finite value."""
    a = dict(zip(rec.kernel.arg_names, rec.args), **rec.kwargs)
    if a["SAFE"]:
        return None
    heads, hd, n, tile, hd_pad = a["HEADS"], a["HD"], a["N"], a["TILE"], a["HD_PAD"]
    nw_tot = a["NW_TOT"]
    tokens = nw_tot * n if a["LAYOUT"] == 0 else nw_tot // a["n_win"] * a["H"] * a["W"]
    row = tokens * heads * hd * a["q_ptr"].element_size()  # one (tokens, C) tensor: q, k, v, out, dout, ...
    lse = nw_tot * heads * n * 4
    programs = math.prod(rec.grid)  # grid (heads, chunks, blocks): each (head, block) walks every tile once
    iters = programs // rec.grid[1] * -(-nw_tot // a["G"])
    dbias = a["dbias_part_ptr"].numel() * 4 if a.get("NEED_DBIAS") else 0
    name = rec.name
    if name == "_fwd_kernel":  # q, k, v in; out, lse out
        nbytes, iters, flops = 4 * row + lse, iters * (tile // a["BK"]), 4 * a["BM"] * a["BK"] * hd_pad
    elif name == "_bwd_fused_kernel":  # q, k, v, out, dout, lse in; dq, dk, dv, dbias partial sums out
        nbytes, flops = 8 * row + lse + dbias, 10 * tile * tile * hd_pad
    elif name == "_bwd_dq_kernel":  # q, k, v, out, dout, lse in; dq, delta, dbias partial sums out
        nbytes, iters, flops = 6 * row + 2 * lse + dbias, iters * (tile // a["BK"]), 6 * a["BM"] * a["BK"] * hd_pad
    elif name == "_bwd_dkv_kernel":  # q, k, v, dout, lse, delta in; dk, dv out
        nbytes, iters, flops = 6 * row + 2 * lse, iters * (tile // a["BQ"]), 8 * a["BN"] * a["BQ"] * hd_pad
    else:
        return None
    return aot.LaunchCounts(bytes=nbytes, loop_iterations=iters, programs=programs, flops=iters * flops,
                            tensor_cores=not a["IS_F32"])



def _aot_map_case(b, h, w, heads, hd, ws, ss, rbp=False, pad=True, alloc=torch.randn):
    def run(dtype):
        c = heads * hd
        qkv = alloc(b, h, w, 3 * c, dtype=dtype)
        table = torch.zeros((2 * ws[0] - 1) * (2 * ws[1] - 1), heads)
        padv = torch.zeros(3 * c, dtype=dtype) if pad else None
        out, lse = swa_forward(qkv, table, padv, heads, ws, ss, hd**-0.5, rbp)
        swa_backward(out, qkv, out, lse, table, padv, heads, ws, ss, hd**-0.5, rbp, True, pad)
    return run


def _aot_windows_case(bw, nw, heads, hd, ws):
    def run(dtype):
        n = ws[0] * ws[1]
        q = torch.randn(bw, heads, n, hd, dtype=dtype)
        table = torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), heads)
        mask = torch.zeros(nw, n, n)
        out, lse = wa_forward(q, q, q, table, mask, ws, hd**-0.5)
        wa_backward(torch.randn_like(out), q, q, q, out, lse, table, mask, ws, hd**-0.5, True)
    return run


SWIN_STAGES = {"t": (96, (3, 6, 12, 24)), "s": (96, (3, 6, 12, 24)), "b": (128, (4, 8, 16, 32))}


def _swin_layer(model: str, stage: int, window: int, batch: int, head_dim: int | None = None):
    """(B, res, res, heads, hd, window, shift) of stage ``stage`` (1-4) of Swin-``model`` at 224 px; a stage
    whose resolution is <= the window uses window = resolution and no shift (as the official code)."""
    embed, heads = SWIN_STAGES[model]
    res, dim = 56 >> (stage - 1), embed << (stage - 1)
    hd = head_dim or dim // heads[stage - 1]
    w, s = (res, 0) if res <= window else (window, window // 2)
    return batch, res, res, max(1, dim // hd), hd, w, s


def aot_cases() -> dict:
    """Launcher calls compiled by :mod:`.aot`. Small cases cover every launcher path (map / windows layout,
    fused / split backward, packing, padding, both roll orders, mask). Realistic cases are the Swin-T/S/B
    stages at W7 and W14 for batches 32 and 128, sized for a 132-SM GPU (many tiles per program, so the
    tile loop is software-pipelined as it is on an H100/H200), plus head dims 16/64/128 at the stage-1 and
    stage-3 shapes. ``ci`` marks the subset CI compiles: every distinct kernel configuration (tile size,
    chunking, head dim, dtype, shift / no shift) once, at batch 128."""
    from .aot import AotCase

    out = {
        "map_w7_shift_pad": AotCase(_aot_map_case(1, 9, 9, 3, 32, (7, 7), (3, 3)), 1, 7, 32),
        "map_w7_timm_hd64": AotCase(_aot_map_case(1, 9, 9, 2, 64, (7, 7), (3, 3), rbp=True), 1, 7, 64),
        "map_w14_split": AotCase(_aot_map_case(1, 14, 14, 4, 32, (14, 14), (7, 7), pad=False), 1, 14, 32),
        "map_w3_packed_hd16": AotCase(_aot_map_case(1, 6, 6, 2, 16, (3, 3), (1, 1)), 1, 3, 16),
        "windows_w7_mask": AotCase(_aot_windows_case(4, 2, 3, 32, (7, 7)), 4, 7, 32),
    }
    ci_stages = {("t", 1, 7), ("t", 4, 7), ("t", 1, 14), ("t", 3, 14)}
    for model in SWIN_STAGES:
        for window in (7, 14):
            for batch in (32, 128):
                for stage in (1, 2, 3, 4):
                    b, h, w, heads, hd, ws, ss = _swin_layer(model, stage, window, batch)
                    name = f"swin_{model}_stage{stage}{'' if window == 7 else f'_w{window}'}_b{batch}"
                    out[name] = AotCase(_aot_map_case(b, h, w, heads, hd, (ws, ws), (ss, ss), pad=False,
                                                      alloc=torch.empty),
                                        batch, ws, hd, realistic=True,
                                        ci=batch == 128 and (model, stage, window) in ci_stages,
                                        model=batch == 128)
    for hd in (16, 64, 128):
        for window in (7, 14):
            for stage in (1, 3):
                b, h, w, heads, _, ws, ss = _swin_layer("t", stage, window, 128, hd)
                out[f"swin_t_stage{stage}{'' if window == 7 else f'_w{window}'}_b128_hd{hd}"] = AotCase(
                    _aot_map_case(b, h, w, heads, hd, (ws, ws), (ss, ss), pad=False, alloc=torch.empty),
                    128, ws, hd, realistic=True, ci=stage == 1 or window == 14)
    return out
