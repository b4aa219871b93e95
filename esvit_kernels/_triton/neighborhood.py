"""Fused Triton kernels for Vision Longformer's 3x3-window attention (``neighborhood_window_attention``).

Addressing
    q, k, v are (B, H, W, C) maps read through their strides (unit last stride); nothing is padded,
    partitioned, unfolded or copied. A program owns one w x w window (m, n) of one image and one head, its
    L = w*w tokens padded to a power-of-two tile BL (49 -> 64). For neighbour chunk c, (dm, dn) = (c // 3 - 1,
    c % 3 - 1), the key tile's rows are computed from (m + dm, n + dn): in-map positions are loaded,
    positions on the virtual zero padding read 0, and the official ``exact`` mask (zero padding, cyclic
    wrap-around, or exact sliding window) is applied per pair inside the kernel. The bias is gathered from
    the ((4w-1)^2, heads) table by index arithmetic. The G global keys form one extra BG-row tile
    (BG = max(16, next_pow2(G))) that opens the online softmax. The backward kernels skip neighbour windows
    outside the grid (zero / exact modes); the forward predicates their loads off instead (kernel notes).

Backward (no atomics, deterministic)
    * dQ kernel, one program per query window and head: recomputes P from the saved logsumexp, writes
      dQ and delta = rowsum(dO * O), and this window's partial sums of the global-key gradients (dK_g, dV_g,
      d global bias), summed afterwards in a fixed order.
    * dK/dV kernel, one program per *key* window and head: the neighbourhood is symmetric, so the queries
      that see key window (m, n) through chunk (dm, dn) are those of window (m - dm, n - dn) (modulo the
      grid in cyclic mode); the program walks the chunks, recomputes P^T and dS^T and accumulates dK, dV
      in registers.
    * local bias table: a third kernel, one program per (group of windows, head, chunk), sums dS of its
      chunk over its windows in registers and writes that (BL, BL) tile once; a deterministic
      gather-and-sum maps the partial tiles onto the table. (It recomputes P and dS; a single pass would
      need nine (BL, BL) accumulators per program.)

Precision: fp32 accumulation; P and dS are cast to the input dtype before the P@V / dS@K / dS^T@Q matmuls;
fp32 inputs use exact ("ieee") dots; under the interpreter bf16 dots are upcast (see window_attention.py).
Non-finite inputs are not isolated per window as in the Swin kernels: a NaN reaches what it touches in
the dots (documented, not tested).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting
from ..reference.neighborhood import neighbor_chunks
from . import aot
from .aot import launch
from .window_attention import LOG2E, _dot, _next_pow2

__all__ = ["nwa_forward", "nwa_backward"]


# ----------------------------------------------------------------------------------------- helpers


@triton.jit
def _chunk(ci, NCH: tl.constexpr, CH1: tl.constexpr):
    """(dm, dn) of the ci-th chunk of the mode: all 9, or the own window (4) then CH1."""
    if NCH == 9:
        c = ci
    else:
        c = 4 + (CH1 - 4) * ci
    return c // 3 - 1, c % 3 - 1


@triton.jit
def _window(wid, MX, MY):
    """Image, window row and column of a flat window id."""
    nw = MX * MY
    b = wid // nw
    r = wid - b * nw
    return b, r // MY, r - (r // MY) * MY


@triton.jit
def _load(ptr, b, r, c, sb, sr, sc, col, ok, d, HD: tl.constexpr):
    """(rows, BD) tile of one head: row t at map position (r[t], c[t]) of image b, 0 where not ok."""
    off = b.to(tl.int64) * sb + r.to(tl.int64) * sr + c.to(tl.int64) * sc + col
    return tl.load(ptr + off[:, None] + d[None, :], mask=ok[:, None] & (d < HD)[None, :], other=0.0)


@triton.jit
def _in_grid(km, kn, MX, MY, EXACT: tl.constexpr):
    """Whether the neighbour window (km, kn) exists (cyclic mode: always, the grid wraps)."""
    if EXACT == -1:
        ok = km == km
    else:
        ok = (km >= 0) & (km < MX) & (kn >= 0) & (kn < MY)
    return ok


@triton.jit
def _keys(km, kn, li, lj, tv, H, W, HP, WP, WIN: tl.constexpr, EXACT: tl.constexpr):
    """Keys of the (unwrapped) window (km, kn): unwrapped rows/cols, actual (wrapped in cyclic mode)
    rows/cols, whether to load (in the map) and whether valid for every query (exact 0 / -1 mask)."""
    kr = km * WIN + li
    kc = kn * WIN + lj
    if EXACT == -1:
        ar = (kr + HP) % HP
        ac = (kc + WP) % WP
        ok = tv & ~(((kr >= H) & (kr < HP)) | ((kc >= W) & (kc < WP)))
    else:
        ar = kr
        ac = kc
        ok = tv & (kr >= 0) & (kr < H) & (kc >= 0) & (kc < W)
    load = tv & (ar >= 0) & (ar < H) & (ac >= 0) & (ac < W)
    return kr, kc, ar, ac, load, ok


@triton.jit
def _pair_mask(kok, kr, kc, qr, qc, qin, WIN: tl.constexpr, EXACT: tl.constexpr, ROWS_ARE_KEYS: tl.constexpr):
    """2-D validity of (query, key) pairs; rows are queries, or keys (the transposed tiles)."""
    if ROWS_ARE_KEYS:
        ok = kok[:, None] & qin[None, :]
        if EXACT == 1:
            ok = ok & (tl.abs(kr[:, None] - qr[None, :]) <= WIN) & (tl.abs(kc[:, None] - qc[None, :]) <= WIN)
    else:
        ok = qin[:, None] & kok[None, :]
        if EXACT == 1:
            ok = ok & (tl.abs(kr[None, :] - qr[:, None]) <= WIN) & (tl.abs(kc[None, :] - qc[:, None]) <= WIN)
    return ok


@triton.jit
def _bias(bias_ptr, bst, bsh, h, li, lj, tv, dm, dn, WIN: tl.constexpr, HAS_BIAS: tl.constexpr,
          ROWS_ARE_KEYS: tl.constexpr):
    """fp32 table[rel(query, key)] for chunk (dm, dn) (0.0 without a table)."""
    if HAS_BIAS:
        if ROWS_ARE_KEYS:
            dr = li[None, :] - li[:, None]
            dc = lj[None, :] - lj[:, None]
            ok = tv[:, None] & tv[None, :]
        else:
            dr = li[:, None] - li[None, :]
            dc = lj[:, None] - lj[None, :]
            ok = tv[:, None] & tv[None, :]
        idx = (dr - dm * WIN + 2 * WIN - 1) * (4 * WIN - 1) + (dc - dn * WIN + 2 * WIN - 1)
        b = tl.load(bias_ptr + idx * bst + h * bsh, mask=ok, other=0.0).to(tl.float32)
    else:
        b = 0.0
    return b


@triton.jit
def _global_logits(q, gk_ptr, gv_ptr, gb_ptr, b, h, G, sgkb, sgkg, sgvb, sgvg, gbh, gbg, scale, d,
                   HD: tl.constexpr, BG: tl.constexpr, HAS_GBIAS: tl.constexpr, DOT_F32: tl.constexpr,
                   IS_F32: tl.constexpr):
    """(BL, BG) fp32 logits of the queries against the global keys (-inf past G), the key and value tiles."""
    gi = tl.arange(0, BG)
    gok = (gi < G)[:, None] & (d < HD)[None, :]
    gk = tl.load(gk_ptr + b.to(tl.int64) * sgkb + gi[:, None] * sgkg + h * HD + d[None, :], mask=gok, other=0.0)
    gv = tl.load(gv_ptr + b.to(tl.int64) * sgvb + gi[:, None] * sgvg + h * HD + d[None, :], mask=gok, other=0.0)
    s = _dot(q, tl.trans(gk), DOT_F32, IS_F32) * scale
    if HAS_GBIAS:
        s += tl.load(gb_ptr + h * gbh + gi * gbg, mask=gi < G, other=0.0).to(tl.float32)[None, :]
    return tl.where((gi < G)[None, :], s, float("-inf")), gk, gv


@triton.jit
def _query_window(wid, H, W, MX, MY, WIN: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr):
    """Geometry of the program's window: image, window (m, n), tile rows t, head-dim lanes d, rows that are
    tokens (tv), their in-window (li, lj) and map (qr, qc) positions, and which lie in the map (qin)."""
    b, m, n = _window(wid, MX, MY)
    t = tl.arange(0, BL)
    d = tl.arange(0, BD)
    tv = t < WIN * WIN
    li = t // WIN
    lj = t - li * WIN
    qr = m * WIN + li
    qc = n * WIN + lj
    return b, m, n, t, d, tv, li, lj, qr, qc, tv & (qr < H) & (qc < W)


@triton.jit
def _chunk_logits(q, k_ptr, v_ptr, bias_ptr, b, m, n, h, dm, dn, li, lj, tv, qr, qc, qin, d, H, W, MX, MY,
                  skb, skr, skc, svb, svr, svc, bst, bsh, scale, HD: tl.constexpr, WIN: tl.constexpr,
                  EXACT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, IS_F32: tl.constexpr):
    """Queries of window (m, n) against the keys of neighbour chunk (dm, dn): fp32 logits (bias added),
    the pair validity, and the chunk's K and V tiles (gathered from the map, zeros on the padding)."""
    kr, kc, ar, ac, kload, kok = _keys(m + dm, n + dn, li, lj, tv, H, W, MX * WIN, MY * WIN, WIN, EXACT)
    k = _load(k_ptr, b, ar, ac, skb, skr, skc, h * HD, kload, d, HD)
    v = _load(v_ptr, b, ar, ac, svb, svr, svc, h * HD, kload, d, HD)
    s = _dot(q, tl.trans(k), DOT_F32, IS_F32) * scale
    s += _bias(bias_ptr, bst, bsh, h, li, lj, tv, dm, dn, WIN, HAS_BIAS, False)
    return s, _pair_mask(kok, kr, kc, qr, qc, qin, WIN, EXACT, False), k, v


# ----------------------------------------------------------------------------------------- forward


@triton.jit
def _nwa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, gk_ptr, gv_ptr, bias_ptr, gb_ptr, out_ptr, lse_ptr,
    H, W, MX, MY, G,
    sqb, sqr, sqc, skb, skr, skc, svb, svr, svc, sob, sor, soc, sgkb, sgkg, sgvb, sgvg, bst, bsh, gbh, gbg,
    scale,
    HEADS: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr, WIN: tl.constexpr, BL: tl.constexpr,
    BG: tl.constexpr, NCH: tl.constexpr, CH1: tl.constexpr, EXACT: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GBIAS: tl.constexpr, DOT_F32: tl.constexpr, IS_F32: tl.constexpr,
):
    """One query window, one head: out and the row logsumexp."""
    wid = tl.program_id(0)
    h = tl.program_id(1)
    b, m, n, t, d, tv, li, lj, qr, qc, qin = _query_window(wid, H, W, MX, MY, WIN, BL, BD)
    q = _load(q_ptr, b, qr, qc, sqb, sqr, sqc, h * HD, qin, d, HD)
    m_i = tl.full((BL,), float("-inf"), tl.float32)
    l_i = tl.zeros((BL,), tl.float32)
    acc = tl.zeros((BL, BD), tl.float32)
    if HAS_GLOBAL:
        sg, _, gv = _global_logits(q, gk_ptr, gv_ptr, gb_ptr, b, h, G, sgkb, sgkg, sgvb, sgvg, gbh, gbg, scale, d,
                                   HD, BG, HAS_GBIAS, DOT_F32, IS_F32)
        m_i = tl.max(sg, 1)
        pg = tl.exp2((sg - m_i[:, None]) * LOG2E)
        l_i = tl.sum(pg, 1)
        acc = _dot(pg.to(gv.dtype), gv, DOT_F32, IS_F32)
    for ci in range(NCH):
        dm, dn = _chunk(ci, NCH, CH1)
        # no skip of chunks outside the grid here (their loads are predicated off): on sm_90 a branch made the
        # forward 247 registers instead of 168 (3 -> 2 blocks per SM); the backward kernels skip them
        s, ok, k, v = _chunk_logits(q, k_ptr, v_ptr, bias_ptr, b, m, n, h, dm, dn, li, lj, tv, qr, qc, tv, d, H, W,
                                    MX, MY, skb, skr, skc, svb, svr, svc, bst, bsh, scale, HD, WIN, EXACT,
                                    HAS_BIAS, DOT_F32, IS_F32)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: p = 0
        p = tl.exp2((s - m_use[:, None]) * LOG2E)
        alpha = tl.exp2((m_i - m_use) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32, IS_F32)
        m_i = m_new
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    off = b.to(tl.int64) * sob + qr.to(tl.int64) * sor + qc.to(tl.int64) * soc + h * HD
    tl.store(out_ptr + off[:, None] + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=qin[:, None] & (d < HD)[None, :])
    tl.store(lse_ptr + (wid.to(tl.int64) * HEADS + h) * BL + t,
             tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i))), mask=tv)


# ----------------------------------------------------------------------------------------- backward


@triton.jit
def _nwa_dq_kernel(
    q_ptr, k_ptr, v_ptr, gk_ptr, gv_ptr, bias_ptr, gb_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr,
    dq_ptr, dgk_ptr, dgv_ptr, dgb_ptr,
    H, W, MX, MY, G,
    sqb, sqr, sqc, skb, skr, skc, svb, svr, svc, sob, sor, soc, sgkb, sgkg, sgvb, sgvg, bst, bsh, gbh, gbg,
    scale,
    HEADS: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr, WIN: tl.constexpr, BL: tl.constexpr,
    BG: tl.constexpr, NCH: tl.constexpr, CH1: tl.constexpr, EXACT: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GBIAS: tl.constexpr, DOT_F32: tl.constexpr, IS_F32: tl.constexpr,
):
    """One query window, one head: dQ, delta, and this window's partial global-key gradients."""
    wid = tl.program_id(0)
    h = tl.program_id(1)
    b, m, n, t, d, tv, li, lj, qr, qc, qin = _query_window(wid, H, W, MX, MY, WIN, BL, BD)
    q = _load(q_ptr, b, qr, qc, sqb, sqr, sqc, h * HD, qin, d, HD)
    do = _load(dout_ptr, b, qr, qc, sob, sor, soc, h * HD, qin, d, HD)
    o = _load(out_ptr, b, qr, qc, sob, sor, soc, h * HD, qin, d, HD)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row = (wid.to(tl.int64) * HEADS + h) * BL + t
    tl.store(delta_ptr + row, delta, mask=tv)
    lse = tl.load(lse_ptr + row, mask=qin, other=float("inf"))
    lse = tl.where(qin, lse, float("inf"))  # rows off the map: P = 0
    dq = tl.zeros((BL, BD), tl.float32)
    if HAS_GLOBAL:
        sg, gk, gv = _global_logits(q, gk_ptr, gv_ptr, gb_ptr, b, h, G, sgkb, sgkg, sgvb, sgvg, gbh, gbg, scale,
                                   d, HD, BG, HAS_GBIAS, DOT_F32, IS_F32)
        gi = tl.arange(0, BG)
        pg = tl.exp2((sg - lse[:, None]) * LOG2E)
        dsg = pg * (_dot(do, tl.trans(gv), DOT_F32, IS_F32) - delta[:, None])
        dq += _dot(dsg.to(gk.dtype), gk, DOT_F32, IS_F32)
        part = (wid.to(tl.int64) * HEADS + h) * BG + gi
        dgk = _dot(tl.trans(dsg.to(q.dtype)), q, DOT_F32, IS_F32) * scale
        dgv = _dot(tl.trans(pg.to(do.dtype)), do, DOT_F32, IS_F32)
        tl.store(dgk_ptr + part[:, None] * BD + d[None, :], dgk)
        tl.store(dgv_ptr + part[:, None] * BD + d[None, :], dgv)
        tl.store(dgb_ptr + part, tl.sum(dsg, 0))
    for ci in range(NCH):
        dm, dn = _chunk(ci, NCH, CH1)
        if _in_grid(m + dm, n + dn, MX, MY, EXACT):  # else every key is masked: skip the chunk
            s, ok, k, v = _chunk_logits(q, k_ptr, v_ptr, bias_ptr, b, m, n, h, dm, dn, li, lj, tv, qr, qc, qin, d, H, W,
                                        MX, MY, skb, skr, skc, svb, svr, svc, bst, bsh, scale, HD, WIN, EXACT,
                                        HAS_BIAS, DOT_F32, IS_F32)
            p = tl.where(ok, tl.exp2((s - lse[:, None]) * LOG2E), 0.0)
            dp = _dot(do, tl.trans(v), DOT_F32, IS_F32)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, DOT_F32, IS_F32)
    off = b.to(tl.int64) * sob + qr.to(tl.int64) * sor + qc.to(tl.int64) * soc + h * HD
    tl.store(dq_ptr + off[:, None] + d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=qin[:, None] & (d < HD)[None, :])


@triton.jit
def _query_side(q_ptr, dout_ptr, lse_ptr, delta_ptr, b, qm, qn, qok, li, lj, tv, H, W, MX, MY,
                sqb, sqr, sqc, sob, sor, soc, h, d, t, HEADS: tl.constexpr, HD: tl.constexpr,
                WIN: tl.constexpr, BL: tl.constexpr):
    """Queries of window (qm, qn) (all masked when not qok): positions, q, dO, lse (+inf off the map),
    delta."""
    qr = qm * WIN + li
    qc = qn * WIN + lj
    qin = tv & (qr < H) & (qc < W) & qok
    q = _load(q_ptr, b, qr, qc, sqb, sqr, sqc, h * HD, qin, d, HD)
    do = _load(dout_ptr, b, qr, qc, sob, sor, soc, h * HD, qin, d, HD)
    qwid = (b * MX + qm) * MY + qn
    row = (qwid.to(tl.int64) * HEADS + h) * BL + t
    lse = tl.load(lse_ptr + row, mask=qin, other=float("inf"))
    lse = tl.where(qin, lse, float("inf"))
    delta = tl.load(delta_ptr + row, mask=qin, other=0.0)
    return qr, qc, qin, q, do, lse, delta


@triton.jit
def _nwa_dkv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    H, W, MX, MY,
    sqb, sqr, sqc, skb, skr, skc, svb, svr, svc, sob, sor, soc, bst, bsh,
    scale,
    HEADS: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr, WIN: tl.constexpr, BL: tl.constexpr,
    NCH: tl.constexpr, CH1: tl.constexpr, EXACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr, IS_F32: tl.constexpr,
):
    """One key window, one head: dK, dV over the query windows that see it (key-centric, no atomics).
    Rows of the tiles are keys (transposed logits)."""
    wid = tl.program_id(0)
    h = tl.program_id(1)
    b, m, n, t, d, tv, li, lj, kr0, kc0, kin = _query_window(wid, H, W, MX, MY, WIN, BL, BD)  # here: keys
    k = _load(k_ptr, b, kr0, kc0, skb, skr, skc, h * HD, kin, d, HD)
    v = _load(v_ptr, b, kr0, kc0, svb, svr, svc, h * HD, kin, d, HD)
    dk = tl.zeros((BL, BD), tl.float32)
    dv = tl.zeros((BL, BD), tl.float32)
    for ci in range(NCH):
        dm, dn = _chunk(ci, NCH, CH1)
        qm = m - dm
        qn = n - dn
        if EXACT == -1:
            qm = (qm + MX) % MX
            qn = (qn + MY) % MY
        qok = (qm >= 0) & (qm < MX) & (qn >= 0) & (qn < MY)
        qm = tl.minimum(tl.maximum(qm, 0), MX - 1)
        qn = tl.minimum(tl.maximum(qn, 0), MY - 1)
        if qok:  # the query window exists (always, in cyclic mode)
            qr, qc, qin, q, do, lse, delta = _query_side(
                q_ptr, dout_ptr, lse_ptr, delta_ptr, b, qm, qn, qok, li, lj, tv, H, W, MX, MY,
                sqb, sqr, sqc, sob, sor, soc, h, d, t, HEADS, HD, WIN, BL)
            # the keys as the query window sees them (unwrapped: qm + dm may differ from m in cyclic mode)
            kr, kc, _, _, _, kok = _keys(qm + dm, qn + dn, li, lj, tv, H, W, MX * WIN, MY * WIN, WIN, EXACT)
            st = _dot(k, tl.trans(q), DOT_F32, IS_F32) * scale
            st += _bias(bias_ptr, bst, bsh, h, li, lj, tv, dm, dn, WIN, HAS_BIAS, True)
            ok = _pair_mask(kok, kr, kc, qr, qc, qin, WIN, EXACT, True)
            pt = tl.where(ok, tl.exp2((st - lse[None, :]) * LOG2E), 0.0)
            dv += _dot(pt.to(do.dtype), do, DOT_F32, IS_F32)
            dpt = _dot(v, tl.trans(do), DOT_F32, IS_F32)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, DOT_F32, IS_F32)
    dmask = kin[:, None] & (d < HD)[None, :]
    off = b.to(tl.int64) * sob + kr0.to(tl.int64) * sor + kc0.to(tl.int64) * soc + h * HD
    tl.store(dk_ptr + off[:, None] + d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=dmask)
    tl.store(dv_ptr + off[:, None] + d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _nwa_dbias_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, lse_ptr, delta_ptr, part_ptr,
    H, W, MX, MY, NWT, wins_per_prog,
    sqb, sqr, sqc, skb, skr, skc, svb, svr, svc, sob, sor, soc, bst, bsh,
    scale,
    HEADS: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr, WIN: tl.constexpr, BL: tl.constexpr,
    NCH: tl.constexpr, CH1: tl.constexpr, EXACT: tl.constexpr, DOT_F32: tl.constexpr, IS_F32: tl.constexpr,
):
    """dS of one chunk summed over a group of query windows (one head): one (BL, BL) partial tile."""
    grp = tl.program_id(0)
    h = tl.program_id(1)
    ci = tl.program_id(2)
    dm, dn = _chunk(ci, NCH, CH1)
    t = tl.arange(0, BL)
    tv = t < WIN * WIN
    bias = _bias(bias_ptr, bst, bsh, h, t // WIN, t % WIN, tv, dm, dn, WIN, True, False)  # same in every window
    acc = tl.zeros((BL, BL), tl.float32)
    for it in range(0, wins_per_prog):
        wid = tl.minimum(grp * wins_per_prog + it, NWT - 1)  # past the end: a repeat, with all queries masked
        b, m, n, t, d, tv, li, lj, _, _, _ = _query_window(wid, H, W, MX, MY, WIN, BL, BD)
        if _in_grid(m + dm, n + dn, MX, MY, EXACT):
            qr, qc, qin, q, do, lse, delta = _query_side(
                q_ptr, dout_ptr, lse_ptr, delta_ptr, b, m, n, grp * wins_per_prog + it < NWT, li, lj, tv, H, W, MX, MY,
                sqb, sqr, sqc, sob, sor, soc, h, d, t, HEADS, HD, WIN, BL)
            s, ok, k, v = _chunk_logits(q, k_ptr, v_ptr, bias_ptr, b, m, n, h, dm, dn, li, lj, tv, qr, qc, qin, d, H, W,
                                        MX, MY, skb, skr, skc, svb, svr, svc, bst, bsh, scale, HD, WIN, EXACT, False,
                                        DOT_F32, IS_F32)
            p = tl.where(ok, tl.exp2((s + bias - lse[:, None]) * LOG2E), 0.0)
            dp = _dot(do, tl.trans(v), DOT_F32, IS_F32)
            acc += p * (dp - delta[:, None])
    tl.store(part_ptr + (((grp.to(tl.int64) * HEADS + h) * NCH + ci) * BL + t[:, None]) * BL + t[None, :], acc)


# ----------------------------------------------------------------------------------------- launchers


def _on_device(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _geometry(q: torch.Tensor, heads: int, window: int, neighbor: int, exact: int, has_bias: bool,
              has_gbias: bool, g: int) -> dict:
    """Constexprs and warps of every kernel. Warps from sm_90 AOT compiles at the ViL-2262 stage-1 shape
    (docs/kernel_notes.md): 4 in half precision at head_dim <= 32 (162-253 registers, no spills, 2-3 blocks
    per SM); fp32's exact dots and head_dim 64 need 8 (at 4 the dK/dV kernel spills 6.8 KB per thread in
    fp32, 192 B in bf16 at head_dim 64)."""
    hd = q.shape[3] // heads
    chunks = neighbor_chunks(neighbor)
    bd = max(16, _next_pow2(hd))
    return dict(
        HEADS=heads, HD=hd, BD=bd, WIN=window, BL=max(16, _next_pow2(window * window)),
        NCH=len(chunks), CH1=chunks[-1], EXACT=exact, HAS_BIAS=has_bias,
        DOT_F32=triton_interpreting() and q.dtype == torch.bfloat16, IS_F32=q.dtype == torch.float32,
        num_warps=8 if q.dtype == torch.float32 or bd >= 64 else 4, HAS_GLOBAL=g > 0, HAS_GBIAS=has_gbias,
        BG=max(16, _next_pow2(g)),  # rows of the global-key tile (tl.dot needs >= 16)
    )


def _strides(*ts) -> tuple:
    out = []
    for x in ts:
        out += [x.stride(0), x.stride(1), x.stride(2)]
    return tuple(out)


def _g_strides(x: torch.Tensor | None) -> tuple:
    return (x.stride(0), x.stride(1)) if x is not None else (0, 0)


def _grid_dims(q: torch.Tensor, window: int) -> tuple[int, int, int]:
    b, h, w, _ = q.shape
    mx, my = -(-h // window), -(-w // window)
    return mx, my, b * mx * my


def nwa_forward(q, k, v, gk, gv, table, gbias, heads, window, neighbor, scale, exact):
    """(out (B, H, W, C) in q's dtype, lse (B*mx*my, heads, BL) fp32)."""
    b, h, w, c = q.shape
    mx, my, nwt = _grid_dims(q, window)
    g = gk.shape[1] if gk is not None else 0
    geo = _geometry(q, heads, window, neighbor, exact, table is not None, gbias is not None, g)
    out = q.new_empty(b, h, w, c)
    lse = q.new_empty(nwt, heads, geo["BL"], dtype=torch.float32)
    if nwt == 0:
        return out, lse
    dummy = q
    with _on_device(q):
        launch(_nwa_fwd_kernel, (nwt, heads),
               q, k, v, gk if g else dummy, gv if g else dummy, table if table is not None else dummy,
               gbias if gbias is not None else dummy, out, lse, h, w, mx, my, g,
               *_strides(q, k, v, out), *_g_strides(gk), *_g_strides(gv),
               *(table.stride() if table is not None else (0, 0)), *(gbias.stride() if gbias is not None else (0, 0)),
               scale, candidates=[{"num_stages": 2}, {"num_stages": 1}], **geo)
    return out, lse


@functools.cache
def _table_gather_index(window: int, neighbor: int, bl: int, device_str: str) -> torch.Tensor:
    """(T, maxc) flat positions (chunk, i, j) of the (NCH, BL, BL) partial tiles whose pair uses table
    entry T, padded with the index of an appended zero: a deterministic gather-and-sum."""
    w = window
    chunks = neighbor_chunks(neighbor)
    li = torch.arange(w * w) // w
    lj = torch.arange(w * w) % w
    rels, poss = [], []
    for ci, c in enumerate(chunks):
        dm, dn = c // 3 - 1, c % 3 - 1
        rel = ((li[:, None] - li[None, :] - dm * w + 2 * w - 1) * (4 * w - 1)
               + (lj[:, None] - lj[None, :] - dn * w + 2 * w - 1))
        pos = ci * bl * bl + torch.arange(w * w)[:, None] * bl + torch.arange(w * w)[None, :]
        rels.append(rel.reshape(-1))
        poss.append(pos.reshape(-1))
    rel, pos = torch.cat(rels), torch.cat(poss)
    n_entries = (4 * w - 1) ** 2
    order = torch.argsort(rel, stable=True)
    rel, pos = rel[order], pos[order]
    counts = torch.bincount(rel, minlength=n_entries)
    idx = torch.full((n_entries, int(counts.max())), len(chunks) * bl * bl, dtype=torch.long)
    start = torch.cumsum(counts, 0) - counts
    idx[rel, torch.arange(rel.numel()) - start[rel]] = pos
    return idx.to(device_str)


def _groups(nwt: int, heads: int, nch: int, device: torch.device) -> tuple[int, int]:
    """(groups, windows per group) of the bias-gradient kernel: about 8 programs per SM on a GPU (each
    walks its windows serially; at 2 per SM the ViL-2262 stage-1 backward would walk 820 windows per
    program; at 8 it is ~200, for a 17 MB fp32 partial buffer)."""
    sms = aot.sm_count(device)
    target = 8 * sms if sms else 4
    groups = max(1, min(nwt, -(-target // (heads * nch))))
    per = -(-nwt // groups)
    return -(-nwt // per), per


def nwa_backward(dout, q, k, v, gk, gv, table, gbias, out, lse, heads, window, neighbor, scale, exact,
                 need_dtable, need_dgbias):
    """(dq, dk, dv (B, H, W, C), dgk, dgv (B, G, C) or empty, dtable ((4w-1)^2, heads) fp32 or empty,
    dgbias (heads, G) fp32 or empty)."""
    b, h, w, c = q.shape
    mx, my, nwt = _grid_dims(q, window)
    g = gk.shape[1] if gk is not None else 0
    geo = _geometry(q, heads, window, neighbor, exact, table is not None, gbias is not None, g)
    bl, bd, hd = geo["BL"], geo["BD"], geo["HD"]
    dev, f32 = q.device, torch.float32
    dq, dk, dv = (torch.empty(b, h, w, c, dtype=q.dtype, device=dev) for _ in range(3))
    empty = q.new_empty(0, dtype=f32)
    if dout.stride() != out.stride():
        dout = dout.contiguous()
    dummy = q
    tab = table if table is not None else dummy
    tab_st = table.stride() if table is not None else (0, 0)
    gb = gbias if gbias is not None else dummy
    gb_st = gbias.stride() if gbias is not None else (0, 0)
    delta = torch.empty_like(lse)
    bg = geo["BG"]
    part_shape = (nwt, heads, bg)
    dgk_p = torch.empty(*part_shape, bd, device=dev, dtype=f32) if g else empty
    dgv_p = torch.empty(*part_shape, bd, device=dev, dtype=f32) if g else empty
    dgb_p = torch.empty(*part_shape, device=dev, dtype=f32) if g else empty
    dtable = q.new_empty(0, dtype=f32)
    if nwt == 0:
        for x in (dq, dk, dv):
            x.zero_()
    else:
        with _on_device(q):
            launch(_nwa_dq_kernel, (nwt, heads),
                   q, k, v, gk if g else dummy, gv if g else dummy, tab, gb, out, dout, lse, delta,
                   dq, dgk_p if g else dummy, dgv_p if g else dummy, dgb_p if g else dummy, h, w, mx, my, g,
                   *_strides(q, k, v, out), *_g_strides(gk), *_g_strides(gv), *tab_st, *gb_st, scale, **geo)
            geo_kv = {kk: vv for kk, vv in geo.items() if kk not in ("BG", "HAS_GLOBAL", "HAS_GBIAS")}
            launch(_nwa_dkv_kernel, (nwt, heads), q, k, v, tab, dout, lse, delta, dk, dv, h, w, mx, my,
                   *_strides(q, k, v, out), *tab_st, scale, **geo_kv)
            if need_dtable and table is not None:
                groups, per = _groups(nwt, heads, geo["NCH"], dev)
                part = torch.empty(groups, heads, geo["NCH"], bl, bl, device=dev, dtype=f32)
                geo_b = {kk: vv for kk, vv in geo_kv.items() if kk != "HAS_BIAS"}
                launch(_nwa_dbias_kernel, (groups, heads, geo["NCH"]), q, k, v, tab, dout, lse, delta, part,
                       h, w, mx, my, nwt, per, *_strides(q, k, v, out), *tab_st, scale, **geo_b)
                flat = part.sum(0).reshape(heads, -1)
                flat = torch.cat([flat, flat.new_zeros(heads, 1)], 1)
                idx = _table_gather_index(window, neighbor, bl, str(dev))
                dtable = flat[:, idx].sum(-1).t().contiguous()
    if need_dtable and table is not None and nwt == 0:
        dtable = torch.zeros(table.shape, device=dev, dtype=f32)
    dgk, dgv, dgb = (q.new_empty(0, dtype=f32) for _ in range(3))  # outputs must not alias
    if g:
        if nwt == 0:
            dgk = torch.zeros(b, g, c, device=dev, dtype=q.dtype)
            dgv = torch.zeros_like(dgk)
            dgb = torch.zeros(heads, g, device=dev, dtype=f32)
        else:
            # (B, windows, heads, BG, BD) -> sum over the windows in a fixed order -> (B, G, heads * hd)
            red = dgk_p.view(b, mx * my, heads, bg, bd).sum(1)[:, :, :g, :hd]
            dgk = red.permute(0, 2, 1, 3).reshape(b, g, c).to(q.dtype)
            red = dgv_p.view(b, mx * my, heads, bg, bd).sum(1)[:, :, :g, :hd]
            dgv = red.permute(0, 2, 1, 3).reshape(b, g, c).to(q.dtype)
            dgb = dgb_p.view(nwt, heads, bg).sum(0)[:, :g].contiguous()
        if not need_dgbias:
            dgb = q.new_empty(0, dtype=f32)
    return dq, dk, dv, dgk, dgv, dtable, dgb


# ----------------------------------------------------------------------------------------- AOT cases


def _aot_case(b, res, heads, hd, window, g, neighbor=0):
    def run(dtype):
        c = heads * hd
        q = torch.empty(b, res, res, c, dtype=dtype)
        gk = torch.empty(b, g, c, dtype=dtype) if g else None
        table = torch.zeros((4 * window - 1) ** 2, heads)
        gbias = torch.zeros(heads, g) if g else None
        out, lse = nwa_forward(q, q, q, gk, gk, table, gbias, heads, window, neighbor, hd**-0.5, 0)
        nwa_backward(out, q, q, q, gk, gk, table, gbias, out, lse, heads, window, neighbor, hd**-0.5, 0, True, True)
    return run


def aot_cases() -> dict:
    """Launcher calls compiled by :mod:`.aot`: a small padded case with two global tokens, and the sparse
    ViL-2262 stages at 224 px, batch 128 (stage 1 also at head_dim 64 and with one neighbour, MODE 1)."""
    from .aot import AotCase

    return {
        "nwa_w3_pad_g2": AotCase(_aot_case(1, 8, 2, 24, 3, 2), 1, 3, 24),
        "vil_stage1_b128": AotCase(_aot_case(128, 56, 3, 32, 7, 1), 128, 7, 32, realistic=True),
        "vil_stage2_b128": AotCase(_aot_case(128, 28, 6, 32, 7, 1), 128, 7, 32, realistic=True, ci=False),
        "vil_stage1_b128_neighbor3": AotCase(_aot_case(128, 56, 3, 32, 7, 1, 3), 128, 7, 32, realistic=True,
                                             ci=False),
        "vil_stage1_b128_hd64": AotCase(_aot_case(128, 56, 2, 64, 7, 1), 128, 7, 64, realistic=True),
    }
