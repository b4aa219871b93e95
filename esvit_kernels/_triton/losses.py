"""Triton kernels for EsViT's region matching, region loss L_R and view loss L_V, with their launchers.

Every kernel streams over the logits' last dimension K in blocks and keeps fp32 running statistics, so
no (B, Ts, Tt) similarity matrix, no gathered (B, Ts, K) teacher rows and no softmax copy of any logits
ever reaches memory. Conventions shared by the kernels:

* Logs are base 2 inside the kernels (``exp2``/``log2`` are the native instructions): a row's scaled
  logits are ``y = x * log2(e) / temp`` and its "lse2" is ``log2 sum 2^y``; losses are converted back
  to natural logs at the end (times ln 2).
* A student row's cross-entropy against a target mass vector P (the sum of the teacher distributions
  that face it) is ``sum_k P_k (lse - x_k) = ln2 * (sum(P) * log2 S - sum_k P_k (y_k - m))`` with
  ``m`` the row's running max and ``S = sum 2^(y - m)``; everything is relative to the running max, so
  large logits do not cancel catastrophically.
* Its gradient is ``(n * softmax(x) - P) / student_temp`` per unit of loss, with n the number of
  teacher rows summed into P. It needs the row's final lse, so in general it is a second streaming
  pass (the backward kernels). When the whole row fits one block (K <= the block size) and a gradient
  is wanted, the forward kernel writes it from registers in the same pass (``WRITE_GRAD``), and the
  backward only scales it by the upstream gradient.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import aot
from .aot import launch

__all__ = [
    "FUSED_GRAD_MAX_K",
    "dino_ce_backward",
    "dino_ce_forward",
    "fuses_grad",
    "region_ce_backward",
    "region_ce_forward",
    "region_match",
    "teacher_stats",
]

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # used inside kernels: must be a constexpr

# Largest K for which the forward writes the gradient in the same pass (the row must also fit one block).
# Tests set it to 0 to exercise the two-pass path at small K.
FUSED_GRAD_MAX_K = 4096
_REGION_MAX_BLOCK_K = 4096  # one student row per program: 4096 fp32 lanes = 16 registers/thread at 8 warps
_DINO_TILE = 8192  # elements of a (student crops x BLOCK_K) tile in the view-loss kernels
_MATCH_BLOCK_S, _MATCH_BLOCK_T, _MATCH_BLOCK_D = 32, 32, 8  # an 8192-element fp32 product tile
_STATS_BLOCK_K = 1024
_STATS_BLOCK_R = 16
STATS_PROGRAMS_CPU = 1  # (row group x column block) programs the statistics kernel aims for off-GPU


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _region_match_kernel(
    s_ptr, t_ptr, out_ptr, V, B, Ts, Tt, D, crop_offset,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t, v, b, i] = argmax_j cos(student[v, b, i], teacher[t, b, j]), first index on ties; a NaN cosine
    wins (it counts as +inf), as NaN does in ``torch.max``.

    One program: BLOCK_S student tokens of one (t, v, b) against all Tt teacher tokens, BLOCK_T at a time;
    fp32 dot products over D in BLOCK_D chunks, teacher norms alongside, running (max, argmax) in registers.
    The student norm is a positive per-row constant, so it cannot change the row's argmax and is skipped.

    The dot is a broadcast multiply + ``tl.sum`` rather than ``tl.dot``: every (i, j) entry is then
    reduced in the same order, so duplicate (or power-of-two-scaled) teacher rows score bit-identically
    and the lowest-index tie rule holds exactly, compiled and in the interpreter (whose BLAS-backed
    ``tl.dot`` gives identical columns different roundings). Matching is a tiny share of the loss's work.
    Pairs with t == crop_offset + v (a crop against its own teacher view) are skipped (not written).
    """
    pid = tl.program_id(0)
    b = pid % B
    v = (pid // B) % V
    t = pid // (B * V)
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    rmask = rows < Ts
    offs_d = tl.arange(0, BLOCK_D)
    s_base = s_ptr + ((v * B + b) * Ts).to(tl.int64) * D
    t_base = t_ptr + ((t * B + b) * Tt).to(tl.int64) * D
    best = tl.full([BLOCK_S], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_S], tl.int32)
    for t0 in range(0, Tt, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        cmask = cols < Tt
        dot = tl.zeros([BLOCK_S, BLOCK_T], tl.float32)
        sq = tl.zeros([BLOCK_T], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dmask = (d0 + offs_d) < D
            a = tl.load(s_base + rows[:, None] * D + d0 + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                        other=0.0).to(tl.float32)
            bt = tl.load(t_base + cols[:, None] * D + d0 + offs_d[None, :], mask=cmask[:, None] & dmask[None, :],
                         other=0.0).to(tl.float32)
            sq += tl.sum(bt * bt, axis=1)
            dot += tl.sum(a[:, None, :] * bt[None, :, :], axis=2)
        cos = dot / tl.maximum(tl.sqrt_rn(sq), 1e-12)[None, :]  # F.normalize's eps
        # a NaN similarity wins (lowest index), as in torch.max; so does +-inf: the reference's cosine of an
        # inf feature is NaN, this one skips the student norm and can see inf / |t|
        cos = tl.where(tl.abs(cos) < float("inf"), cos, float("inf"))
        cos = tl.where(cmask[None, :], cos, float("-inf"))
        blk_max = tl.max(cos, axis=1)
        blk_idx = tl.min(tl.where(cos == blk_max[:, None], cols[None, :], 2147483647), axis=1)
        better = blk_max > best  # strict: an equal value in a later block keeps the earlier (lower) index
        best = tl.where(better, blk_max, best)
        best_idx = tl.where(better, blk_idx, best_idx)
    out = out_ptr + ((t * V + v) * B + b) * Ts + rows
    tl.store(out, best_idx.to(tl.int64), mask=rmask & (t != crop_offset + v))


@triton.jit
def _teacher_stats_kernel(
    t_ptr, c_ptr, pmax_ptr, psum_ptr, colsum_ptr, R, K, rows_per_group, t_scale2,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, WANT_SUM: tl.constexpr,
):
    """Split-K statistics of y = (t - c) * log2(e) / teacher_temp for teacher rows (R, K).

    Program (g, kb) covers rows [g * rows_per_group, ...) and columns block kb: it writes, per row, the
    block's max and sum 2^(y - max) (merged over blocks on the host side), and with WANT_SUM the column
    sums of the raw logits over its rows (the center EMA's batch mean; deterministic, no atomics).
    """
    g = tl.program_id(0)
    kb = tl.program_id(1)
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = cols < K
    c = tl.load(c_ptr + cols, mask=kmask, other=0.0).to(tl.float32)
    csum = tl.zeros([BLOCK_K], tl.float32)
    r_start = g * rows_per_group
    r_end = tl.minimum(r_start + rows_per_group, R)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        m2 = rmask[:, None] & kmask[None, :]
        x = tl.load(t_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if WANT_SUM:
            csum += tl.sum(x, axis=0)
        y = tl.where(kmask[None, :], (x - c[None, :]) * t_scale2, float("-inf"))
        mx = tl.max(y, axis=1)
        sm = tl.sum(tl.exp2(y - mx[:, None]), axis=1)
        tl.store(pmax_ptr + kb * R + rows, mx, mask=rmask)
        tl.store(psum_ptr + kb * R + rows, sm, mask=rmask)
    if WANT_SUM:
        tl.store(colsum_ptr + g * K + cols, csum, mask=kmask)


@triton.jit
def _merge_block(m, S, A, Ps, y, y0, P):
    """Fold one [rows, BLOCK_K] block into each row's running (max m, S = sum 2^(y - m),
    A = sum P (y - m), Ps = sum P). y is -inf at masked columns, y0 is 0 there, P is 0 there."""
    m_new = tl.maximum(m, tl.max(y, axis=1))
    dm = tl.where(m > float("-inf"), m - m_new, 0.0)
    S = S * tl.exp2(dm) + tl.sum(tl.exp2(y - m_new[:, None]), axis=1)
    A = A + Ps * dm + tl.sum(P * (y0 - m_new[:, None]), axis=1)
    Ps = Ps + tl.sum(P, axis=1)
    return m_new, S, A, Ps


@triton.jit
def _region_block(
    s_row, t_ptr, tlse_ptr, c_ptr, match_ptr, cols, v, b, i, V, B, Ts, Tt, T, K, crop_offset,
    s_scale2, t_scale2, BLOCK_K: tl.constexpr,
):
    """One [1, BLOCK_K] block of a student row: its scaled logits (y: -inf-masked, y0: 0-masked) and the
    target P = sum over the teacher views t != crop_offset + v of the matched teacher row's softmax."""
    kmask = cols < K
    y0 = tl.load(s_row + cols, mask=kmask, other=0.0).to(tl.float32) * s_scale2
    y = tl.where(kmask, y0, float("-inf"))
    c = tl.load(c_ptr + cols, mask=kmask, other=0.0).to(tl.float32)
    P = tl.zeros([1, BLOCK_K], tl.float32)
    for t in range(T):
        if t != crop_offset + v:
            j = tl.load(match_ptr + ((t * V + v) * B + b) * Ts + i)
            trow = ((t * B + b) * Tt + j).to(tl.int64)
            lse2 = tl.load(tlse_ptr + trow)
            x = tl.load(t_ptr + trow * K + cols, mask=kmask, other=0.0).to(tl.float32)
            P += tl.where(kmask, tl.exp2((x - c) * t_scale2 - lse2), 0.0)
    return y, y0, P


@triton.jit
def _region_ce_fwd_kernel(
    s_ptr, t_ptr, tlse_ptr, c_ptr, match_ptr, ce_ptr, slse_ptr, grad_ptr,
    V, B, Ts, Tt, T, K, crop_offset, s_scale2, t_scale2, grad_scale,
    BLOCK_K: tl.constexpr, ONE_BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """One program per student row r = (v, b, i) of (V, B, Ts, K): ce[r] = sum over its teacher views of
    the cross-entropy against the matched teacher row; slse[r] = lse2 of the row (for the backward)."""
    r = tl.program_id(0)
    i = r % Ts
    b = (r // Ts) % B
    v = r // (Ts * B)
    s_row = s_ptr + r.to(tl.int64) * K
    offs = tl.arange(0, BLOCK_K)[None, :]
    m = tl.full([1], float("-inf"), tl.float32)
    S = tl.zeros([1], tl.float32)
    A = tl.zeros([1], tl.float32)
    Ps = tl.zeros([1], tl.float32)
    if ONE_BLOCK:
        y, y0, P = _region_block(s_row, t_ptr, tlse_ptr, c_ptr, match_ptr, offs, v, b, i, V, B, Ts, Tt, T, K,
                                 crop_offset, s_scale2, t_scale2, BLOCK_K)
        m, S, A, Ps = _merge_block(m, S, A, Ps, y, y0, P)
    else:
        for k0 in range(0, K, BLOCK_K):
            y, y0, P = _region_block(s_row, t_ptr, tlse_ptr, c_ptr, match_ptr, k0 + offs, v, b, i, V, B, Ts,
                                     Tt, T, K, crop_offset, s_scale2, t_scale2, BLOCK_K)
            m, S, A, Ps = _merge_block(m, S, A, Ps, y, y0, P)
    log2s = tl.log2(S)
    one = tl.arange(0, 1)
    tl.store(ce_ptr + r + one, (Ps * log2s - A) * LN2)
    tl.store(slse_ptr + r + one, m + log2s)
    if WRITE_GRAD:  # only with ONE_BLOCK: y and P of the whole row are still in registers
        n_act = (T - (crop_offset + v < T).to(tl.int32)).to(tl.float32)
        g = (n_act * tl.exp2(y - (m + log2s)[:, None]) - P) * grad_scale
        tl.store(grad_ptr + r.to(tl.int64) * K + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < K)


@triton.jit
def _region_ce_bwd_kernel(
    gout_ptr, s_ptr, t_ptr, tlse_ptr, c_ptr, match_ptr, slse_ptr, grad_ptr,
    V, B, Ts, Tt, T, K, crop_offset, s_scale2, t_scale2, weight_over_temp,
    BLOCK_K: tl.constexpr,
):
    """Second streaming pass: grad[r] = upstream * weight / ts * (n * softmax(s[r] / ts) - P[r])."""
    r = tl.program_id(0)
    i = r % Ts
    b = (r // Ts) % B
    v = r // (Ts * B)
    s_row = s_ptr + r.to(tl.int64) * K
    g_row = grad_ptr + r.to(tl.int64) * K
    offs = tl.arange(0, BLOCK_K)[None, :]
    scale = tl.load(gout_ptr).to(tl.float32) * weight_over_temp
    lse2 = tl.load(slse_ptr + r)
    n_act = (T - (crop_offset + v < T).to(tl.int32)).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        y, y0, P = _region_block(s_row, t_ptr, tlse_ptr, c_ptr, match_ptr, cols, v, b, i, V, B, Ts, Tt, T, K,
                                 crop_offset, s_scale2, t_scale2, BLOCK_K)
        g = (n_act * tl.exp2(y - lse2) - P) * scale
        tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < K)


@triton.jit
def _dino_block(
    s_ptr, t_ptr, tlse_ptr, c_ptr, crops, cols, b, B, S, T, K, s_scale2, t_scale2,
    S_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [S_PAD, BLOCK_K] block of sample b: every student crop's scaled logits and its target
    P_v = sum_{t != v} p_t[b] (= q_b - p_v[b] for v < T, q_b otherwise), each teacher softmax p_t[b]
    computed once and shared by all crops. The sum skips t = v instead of subtracting p_v from q_b, so
    a peaked p_v cannot swallow the other teachers' small probabilities in rounding."""
    kmask = cols < K
    y0 = tl.load(s_ptr + (crops * B + b).to(tl.int64) * K + cols, mask=(crops < S) & kmask,
                 other=0.0).to(tl.float32) * s_scale2
    y = tl.where(kmask, y0, float("-inf"))
    c = tl.load(c_ptr + cols, mask=kmask, other=0.0).to(tl.float32)
    P = tl.zeros([S_PAD, BLOCK_K], tl.float32)
    for t in range(T):
        lse2 = tl.load(tlse_ptr + t * B + b)
        x = tl.load(t_ptr + (t * B + b).to(tl.int64) * K + cols, mask=kmask, other=0.0).to(tl.float32)
        p = tl.where(kmask, tl.exp2((x - c) * t_scale2 - lse2), 0.0)
        P += tl.where(crops != t, p, 0.0)
    return y, y0, P


@triton.jit
def _dino_ce_fwd_kernel(
    s_ptr, t_ptr, tlse_ptr, c_ptr, ce_ptr, slse_ptr, grad_ptr, B, S, T, K, s_scale2, t_scale2, grad_scale,
    S_PAD: tl.constexpr, BLOCK_K: tl.constexpr, ONE_BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """One program per sample b: ce[v * B + b] = sum_{t != v} CE(p_t[b], student[v, b]) for all S crops."""
    b = tl.program_id(0)
    crops = tl.arange(0, S_PAD)[:, None]
    offs = tl.arange(0, BLOCK_K)[None, :]
    m = tl.full([S_PAD], float("-inf"), tl.float32)
    Ssum = tl.zeros([S_PAD], tl.float32)
    A = tl.zeros([S_PAD], tl.float32)
    Ps = tl.zeros([S_PAD], tl.float32)
    if ONE_BLOCK:
        y, y0, P = _dino_block(s_ptr, t_ptr, tlse_ptr, c_ptr, crops, offs, b, B, S, T, K, s_scale2, t_scale2,
                               S_PAD, BLOCK_K)
        m, Ssum, A, Ps = _merge_block(m, Ssum, A, Ps, y, y0, P)
    else:
        for k0 in range(0, K, BLOCK_K):
            y, y0, P = _dino_block(s_ptr, t_ptr, tlse_ptr, c_ptr, crops, k0 + offs, b, B, S, T, K, s_scale2,
                                   t_scale2, S_PAD, BLOCK_K)
            m, Ssum, A, Ps = _merge_block(m, Ssum, A, Ps, y, y0, P)
    log2s = tl.log2(Ssum)
    v = tl.arange(0, S_PAD)
    tl.store(ce_ptr + v * B + b, (Ps * log2s - A) * LN2, mask=v < S)
    tl.store(slse_ptr + v * B + b, m + log2s, mask=v < S)
    if WRITE_GRAD:  # only with ONE_BLOCK
        n_act = (T - (crops < T).to(tl.int32)).to(tl.float32)
        g = (n_act * tl.exp2(y - (m + log2s)[:, None]) - P) * grad_scale
        tl.store(grad_ptr + (crops * B + b).to(tl.int64) * K + offs, g.to(grad_ptr.dtype.element_ty),
                 mask=(crops < S) & (offs < K))


@triton.jit
def _dino_ce_bwd_kernel(
    gout_ptr, s_ptr, t_ptr, tlse_ptr, c_ptr, slse_ptr, grad_ptr, B, S, T, K, s_scale2, t_scale2,
    weight_over_temp, S_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Second streaming pass of the view loss: the gradient of every student crop of sample b."""
    b = tl.program_id(0)
    crops = tl.arange(0, S_PAD)[:, None]
    offs = tl.arange(0, BLOCK_K)[None, :]
    scale = tl.load(gout_ptr).to(tl.float32) * weight_over_temp
    lse2 = tl.load(slse_ptr + crops * B + b, mask=crops < S, other=0.0)
    n_act = (T - (crops < T).to(tl.int32)).to(tl.float32)
    rows = (crops * B + b).to(tl.int64) * K
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        y, y0, P = _dino_block(s_ptr, t_ptr, tlse_ptr, c_ptr, crops, cols, b, B, S, T, K, s_scale2, t_scale2,
                               S_PAD, BLOCK_K)
        g = (n_act * tl.exp2(y - lse2) - P) * scale
        tl.store(grad_ptr + rows + cols, g.to(grad_ptr.dtype.element_ty), mask=(crops < S) & (cols < K))


# ----------------------------------------------------------------------------------------- launchers


def _device(x: torch.Tensor):
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return min(p, hi) if hi is not None else p


def _region_block_k(k: int) -> int:
    return _pow2(k, 16, _REGION_MAX_BLOCK_K)


def _dino_block_k(k: int, s: int) -> int:
    return _pow2(k, 16, max(16, _DINO_TILE // _pow2(s)))


def fuses_grad(op: str, k: int, n_crops: int = 1) -> bool:
    """Whether the forward of ``op`` ("region" | "dino") writes the gradient itself at this K (the row
    must fit one block). Shared with the fake implementations so shapes agree."""
    block = _region_block_k(k) if op == "region" else _dino_block_k(k, n_crops)
    return k <= min(block, FUSED_GRAD_MAX_K)


def _warps(tile: int) -> int:
    return 8 if tile >= 2048 else 4


def region_match(student: torch.Tensor, teacher: torch.Tensor, crop_offset: int) -> torch.Tensor:
    """student (V, B, Ts, D), teacher (T, B, Tt, D), same dtype -> (T, V, B, Ts) int64 argmax indices;
    entries of the pairs t == crop_offset + v are 0 (not computed)."""
    v, b, ts, d = student.shape
    t, _, tt, _ = teacher.shape
    out = torch.zeros((t, v, b, ts), dtype=torch.int64, device=student.device)
    if out.numel() == 0:
        return out
    block_s = _pow2(ts, 1, _MATCH_BLOCK_S)
    block_t = _pow2(tt, 1, _MATCH_BLOCK_T)
    with _device(student):
        launch(_region_match_kernel, (t * v * b, triton.cdiv(ts, block_s)),
            student, teacher, out, v, b, ts, tt, d, crop_offset,
            BLOCK_S=block_s, BLOCK_T=block_t, BLOCK_D=_MATCH_BLOCK_D, num_warps=4,
        )
    return out


# The loss kernels compute each scaled logit y = x * log2(e) / T once and subtract statistics taken from
# it (max, log-sum-exp): with fused multiply-adds the compiler would compute x * s - lse2 from the unrounded
# product, so the row's maximum no longer gives exactly 2^(-log2 S). At |x / T| ~ 1e5 (tested) that moved the
# fp32 loss by 1e-3 relative on an H200 while the interpreter and the reference agreed to 1e-7; without
# contraction the GPU rounds like them. The kernels are memory-bound: the unfused instructions are free.
_NO_FMA = {"enable_fp_fusion": False}


def teacher_stats(
    teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float, want_mean: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """teacher (..., K) contiguous, center (K,) -> (lse2 (R,) float32 of (t - c) * log2(e) / teacher_temp
    per row, the (1, K) float32 mean of the raw rows when ``want_mean`` else an empty tensor)."""
    k = teacher.shape[-1]
    r = teacher.numel() // k
    block_k = _pow2(k, 16, _STATS_BLOCK_K)
    block_r = _pow2(r, 1, _STATS_BLOCK_R)
    nkb = triton.cdiv(k, block_k)
    # enough (row group, column block) programs to fill the GPU; few under the interpreter
    sms = aot.sm_count(teacher.device)
    target = 4 * sms if sms else STATS_PROGRAMS_CPU
    groups = max(1, min(triton.cdiv(r, block_r), triton.cdiv(target, nkb)))
    rows_per_group = triton.cdiv(triton.cdiv(r, groups), block_r) * block_r
    groups = triton.cdiv(r, rows_per_group)
    f32 = {"dtype": torch.float32, "device": teacher.device}
    pmax = torch.empty((nkb, r), **f32)
    psum = torch.empty((nkb, r), **f32)
    colsum = torch.empty((groups, k) if want_mean else (1,), **f32)
    with _device(teacher):
        launch(_teacher_stats_kernel, (groups, nkb),
            teacher, center, pmax, psum, colsum, r, k, rows_per_group, LOG2E / teacher_temp,
            BLOCK_R=block_r, BLOCK_K=block_k, WANT_SUM=want_mean, num_warps=8, **_NO_FMA,
        )
    mx = pmax.max(dim=0).values
    lse2 = mx + torch.log2((psum * torch.exp2(pmax - mx)).sum(dim=0))
    mean = colsum.sum(dim=0, keepdim=True) / r if want_mean else colsum.new_empty(0)
    return lse2, mean


def _region_args(student, teacher, teacher_lse2, center, match, crop_offset, student_temp, teacher_temp):
    v, b, ts, k = student.shape
    t, _, tt, _ = teacher.shape
    return (student, teacher, teacher_lse2, center, match), (v, b, ts, tt, t, k, crop_offset,
                                                             LOG2E / student_temp, LOG2E / teacher_temp)


def region_ce_forward(
    student: torch.Tensor, teacher: torch.Tensor, teacher_lse2: torch.Tensor, center: torch.Tensor,
    match: torch.Tensor, crop_offset: int, student_temp: float, teacher_temp: float, weight: float,
    fuse_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Region cross-entropy of student (V, B, Ts, K) against teacher (T, B, Tt, K) through match
    (T, V, B, Ts), skipping t == crop_offset + v. Returns (weight * sum of the row losses (0-d float32),
    per-row lse2 (V*B*Ts,), the gradient for a unit upstream gradient (V, B, Ts, K) when ``fuse_grad``
    and :func:`fuses_grad` allow it, else an empty tensor)."""
    v, b, ts, k = student.shape
    rows = v * b * ts
    block_k = _region_block_k(k)
    write_grad = fuse_grad and fuses_grad("region", k)
    ce = torch.empty(rows, dtype=torch.float32, device=student.device)
    slse = torch.empty_like(ce)
    grad = torch.empty_like(student) if write_grad else student.new_empty(0)
    if rows:
        ptrs, scalars = _region_args(student, teacher, teacher_lse2, center, match, crop_offset, student_temp,
                                     teacher_temp)
        with _device(student):
            launch(_region_ce_fwd_kernel, (rows,),
                *ptrs, ce, slse, grad, *scalars, weight / student_temp,
                BLOCK_K=block_k, ONE_BLOCK=k <= block_k, WRITE_GRAD=write_grad, num_warps=_warps(block_k),
                **_NO_FMA,
            )
    return ce.sum() * weight, slse, grad


def region_ce_backward(
    grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, teacher_lse2: torch.Tensor,
    center: torch.Tensor, match: torch.Tensor, student_lse2: torch.Tensor, crop_offset: int,
    student_temp: float, teacher_temp: float, weight: float,
) -> torch.Tensor:
    """Gradient of :func:`region_ce_forward`'s loss w.r.t. the student logits (a second streaming pass)."""
    v, b, ts, k = student.shape
    grad = torch.empty_like(student)
    if grad.numel():
        block_k = _region_block_k(k)
        ptrs, scalars = _region_args(student, teacher, teacher_lse2, center, match, crop_offset, student_temp,
                                     teacher_temp)
        with _device(student):
            launch(_region_ce_bwd_kernel, (v * b * ts,),
                grad_loss, *ptrs, student_lse2, grad, *scalars, weight / student_temp,
                BLOCK_K=block_k, num_warps=_warps(block_k), **_NO_FMA,
            )
    return grad


def dino_ce_forward(
    student: torch.Tensor, teacher: torch.Tensor, teacher_lse2: torch.Tensor, center: torch.Tensor,
    student_temp: float, teacher_temp: float, weight: float, fuse_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """View cross-entropy of student crops (S, B, K) against teacher views (T, B, K), every pair t != v.
    Returns like :func:`region_ce_forward` (per-row lse2 is (S*B,), indexed v * B + b)."""
    s, b, k = student.shape
    t = teacher.shape[0]
    s_pad = _pow2(s)
    block_k = _dino_block_k(k, s)
    write_grad = fuse_grad and fuses_grad("dino", k, s)
    ce = torch.empty(s * b, dtype=torch.float32, device=student.device)
    slse = torch.empty_like(ce)
    grad = torch.empty_like(student) if write_grad else student.new_empty(0)
    if b:
        with _device(student):
            launch(_dino_ce_fwd_kernel, (b,),
                student, teacher, teacher_lse2, center, ce, slse, grad, b, s, t, k, LOG2E / student_temp,
                LOG2E / teacher_temp, weight / student_temp,
                S_PAD=s_pad, BLOCK_K=block_k, ONE_BLOCK=k <= block_k, WRITE_GRAD=write_grad,
                num_warps=_warps(s_pad * block_k), **_NO_FMA,
            )
    return ce.sum() * weight, slse, grad


def dino_ce_backward(
    grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, teacher_lse2: torch.Tensor,
    center: torch.Tensor, student_lse2: torch.Tensor, student_temp: float, teacher_temp: float, weight: float,
) -> torch.Tensor:
    """Gradient of :func:`dino_ce_forward`'s loss w.r.t. the student logits (a second streaming pass)."""
    s, b, k = student.shape
    grad = torch.empty_like(student)
    if grad.numel():
        s_pad = _pow2(s)
        block_k = _dino_block_k(k, s)
        with _device(student):
            launch(_dino_ce_bwd_kernel, (b,),
                grad_loss, student, teacher, teacher_lse2, center, student_lse2, grad, b, s, teacher.shape[0], k,
                LOG2E / student_temp, LOG2E / teacher_temp, weight / student_temp,
                S_PAD=s_pad, BLOCK_K=block_k, num_warps=_warps(s_pad * block_k), **_NO_FMA,
            )
    return grad


def aot_cases() -> dict:
    """Small-batch calls of every launcher path at EsViT's real K (65536: multi-block streaming and the
    second backward pass) and at a K that fits one block (the gradient written in the forward), keyed by
    a label. Used by :mod:`.aot` to compile every kernel variant for a GPU (block sizes depend on K and the
    token counts, not on the batch)."""
    from .aot import AotCase

    def region(k):
        def run(dtype):
            student = torch.randn(2, 1, 9, k, dtype=dtype)
            teacher = torch.randn(2, 1, 49, k, dtype=dtype)
            feats_s, feats_t = torch.randn(2, 1, 9, 64, dtype=dtype), torch.randn(2, 1, 49, 64, dtype=dtype)
            center = torch.zeros(k)
            lse2, _ = teacher_stats(teacher, center, 0.04, True)
            match = region_match(feats_s, feats_t, 0)
            _, slse, _ = region_ce_forward(student, teacher, lse2, center, match, 0, 0.1, 0.04, 1.0, True)
            region_ce_backward(torch.ones(()), student, teacher, lse2, center, match, slse, 0, 0.1, 0.04, 1.0)
        return run

    def dino(k):
        def run(dtype):
            student, teacher = torch.randn(10, 2, k, dtype=dtype), torch.randn(2, 2, k, dtype=dtype)
            center = torch.zeros(k)
            lse2, _ = teacher_stats(teacher, center, 0.04, False)
            _, slse, _ = dino_ce_forward(student, teacher, lse2, center, 0.1, 0.04, 1.0, True)
            dino_ce_backward(torch.ones(()), student, teacher, lse2, center, slse, 0.1, 0.04, 1.0)
        return run

    return {"region_k65536": AotCase(region(65536), 1), "region_k4096": AotCase(region(4096), 1),
            "dino_k65536": AotCase(dino(65536), 2), "dino_k1000": AotCase(dino(1000), 2)}
