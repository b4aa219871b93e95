"""Public functional API: validate inputs, pick a backend, call it.

Every op takes ``backend="auto" | "triton" | "cuda" | "torch"``; see :mod:`esvit_kernels.backends`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reference
from .backends import backend_name
from .checks import CENTER_DTYPES, check_same, check_sizes, check_temperature, check_tensor, pair
from .ops import losses as _loss_ops
from .ops import neighborhood as _neighborhood_ops
from .ops import window_attention as _window_ops
from .reference.neighborhood import EXACT_MODES, NEIGHBOR_MODES

__all__ = [
    "window_attention",
    "shifted_window_attention",
    "neighborhood_window_attention",
    "global_token_attention",
    "region_match",
    "region_loss",
    "dino_loss",
    "multi_region_loss",
]


def _check_unit_stride(x: torch.Tensor, name: str, backend: str) -> None:
    if backend != "torch" and x.dim() and x.stride(-1) != 1:
        raise ValueError(
            f"{name} must have unit stride in its last dimension for the {backend} backend "
            f"(got strides {x.stride()}); call .contiguous() first"
        )


def _check_window(window_size, shift_size=(0, 0)) -> tuple[tuple[int, int], tuple[int, int]]:
    ws = pair(window_size, "window_size")
    ss = pair(shift_size, "shift_size")
    if min(ws) < 1:
        raise ValueError(f"window_size must be >= 1, got {ws}")
    for s, w, axis in zip(ss, ws, "hw"):
        if s < 0 or s >= w:
            raise ValueError(f"shift_size must satisfy 0 <= shift < window on axis {axis}, got shift {ss} "
                             f"for window {ws}")
    return ws, ss


def _check_bias_table(bias_table, ws, heads, ref: torch.Tensor) -> None:
    if bias_table is None:
        return
    check_tensor(bias_table, "bias_table", ndim=2)
    want = ((2 * ws[0] - 1) * (2 * ws[1] - 1), heads)
    if tuple(bias_table.shape) != want:
        raise ValueError(f"bias_table must have shape ((2Wh-1)(2Ww-1), heads) = {want} for window {ws} and "
                         f"{heads} heads, got {tuple(bias_table.shape)}")
    check_same({"q": ref, "bias_table": bias_table}, dtype=False)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window_size: int | tuple[int, int],
    bias_table: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention inside windows with a relative-position bias: the drop-in for what Swin's
    ``WindowAttention`` does between its qkv and proj Linears.

    Args:
        q, k, v: (B*nW, heads, N, head_dim), N = Wh*Ww, the windows of one image contiguous (timm's
            convention). Strided views (e.g. ``qkv.unbind``) are read in place.
        window_size: W or (Wh, Ww).
        bias_table: ((2Wh-1)(2Ww-1), heads) relative-position bias table, gathered inside the kernel.
        mask: optional additive (nW, N, N) mask; window b uses ``mask[b % nW]``. Not differentiated.
        scale: logit scale, default head_dim ** -0.5.

    Returns:
        (B*nW, heads, N, head_dim) in q's dtype (fused backends return a view of a (B*nW, N, heads,
        head_dim) buffer so ``out.transpose(1, 2).reshape(B*nW, N, C)`` is free).

    Every backend: windows are independent (a NaN/inf in one window's q, k, v or mask reaches only that
    window's outputs and gradients, as in the eager reference; the bias-table gradient sums all windows);
    a query whose logits are all -inf (its mask hides every key) gets output 0 and zero gradients, as in
    PyTorch's SDPA math path; B*nW = 0 gives an empty output; 0 heads or head_dim 0 is a ValueError.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, ndim=4)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_same({"q": q, "k": k, "v": v})
    ws, _ = _check_window(window_size)
    bw, heads, n, hd = q.shape
    check_sizes("window_attention", "heads >= 1 and head_dim >= 1 in q, k, v (B*nW, heads, N, head_dim)",
                heads=heads, head_dim=hd)
    if n != ws[0] * ws[1]:
        raise ValueError(f"q has N={n} tokens per window but window {ws} has {ws[0] * ws[1]}")
    _check_bias_table(bias_table, ws, heads, q)
    if mask is not None:
        check_tensor(mask, "mask", ndim=3)
        if mask.shape[1:] != (n, n) or mask.shape[0] < 1 or bw % mask.shape[0] != 0:
            raise ValueError(f"mask must have shape (nW, {n}, {n}) with nW dividing B*nW={bw}, "
                             f"got {tuple(mask.shape)}")
        check_same({"q": q, "mask": mask}, dtype=False)
    scale = hd**-0.5 if scale is None else float(scale)
    name = backend_name(backend, q.device.type, "window_attention")
    if name == "torch":
        return reference.window_attention(q, k, v, ws, bias_table, mask, scale)
    for t, tn in ((q, "q"), (k, "k"), (v, "v"), (mask, "mask")):
        if t is not None:
            _check_unit_stride(t, tn, name)
    return _window_ops.get("window_attention", name)(q, k, v, ws, bias_table, mask, scale)


def shifted_window_attention(
    qkv: torch.Tensor,
    *,
    num_heads: int,
    window_size: int | tuple[int, int],
    shift_size: int | tuple[int, int] = 0,
    bias_table: torch.Tensor | None = None,
    scale: float | None = None,
    pad_qkv: torch.Tensor | None = None,
    roll_before_pad: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """(Shifted-)window attention straight on the (B, H, W, 3C) map out of the qkv Linear.

    Equal to: pad to a multiple of the window -> roll(-shift) -> partition -> attention with the
    relative-position bias and the shift mask -> reverse -> roll(+shift) -> crop, but the fused backends
    do the padding, roll, partition, mask and reverse by index arithmetic: no padded, rolled, partitioned
    or mask tensor is materialised, and the output is written straight back to (B, H, W, C).

    Args:
        qkv: (B, H, W, 3C), last dim ordered (3, heads, head_dim) as ``nn.Linear(C, 3C)`` produces it.
        num_heads: heads; C must be a multiple of it.
        window_size, shift_size: int or (h, w); 0 <= shift < window.
        bias_table: ((2Wh-1)(2Ww-1), heads).
        scale: logit scale, default head_dim ** -0.5.
        pad_qkv: (3C,) qkv of the padding tokens when H or W is not a multiple of the window (the qkv
            Linear's bias: the map is zero-padded after LayerNorm); zeros when None. Padded tokens are
            not masked; they take part in attention. Receives a gradient.
        roll_before_pad: False = official Swin/EsViT order (pad, then roll on the padded map);
            True = timm's order (roll the unpadded map, then pad).

    Returns:
        (B, H, W, C) in qkv's dtype. Windows are independent as in :func:`window_attention` (a NaN pad_qkv
        reaches the windows that hold padding); B = 0 gives an empty output, H, W or head_dim 0 a ValueError.
    """
    check_tensor(qkv, "qkv", ndim=4)
    ws, ss = _check_window(window_size, shift_size)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    b, h, w, c3 = qkv.shape
    if c3 % (3 * num_heads) != 0:
        raise ValueError(f"qkv's last dim ({c3}) must be 3 * num_heads * head_dim with num_heads={num_heads}")
    check_sizes("shifted_window_attention", "H, W >= 1 and head_dim = C / num_heads >= 1 in qkv (B, H, W, 3C)",
                H=h, W=w, head_dim=c3 // (3 * num_heads))
    _check_bias_table(bias_table, ws, num_heads, qkv)
    if pad_qkv is not None:
        check_tensor(pad_qkv, "pad_qkv", ndim=1)
        if pad_qkv.shape[0] != c3:
            raise ValueError(f"pad_qkv must have shape ({c3},), got {tuple(pad_qkv.shape)}")
        check_same({"qkv": qkv, "pad_qkv": pad_qkv}, dtype=False)
    hd = c3 // (3 * num_heads)
    scale = hd**-0.5 if scale is None else float(scale)
    name = backend_name(backend, qkv.device.type, "shifted_window_attention")
    if name == "torch":
        return reference.shifted_window_attention(
            qkv, num_heads, ws, ss, bias_table, scale, pad_qkv, roll_before_pad
        )
    _check_unit_stride(qkv, "qkv", name)
    if pad_qkv is not None and not pad_qkv.is_contiguous():  # the kernels read it as a dense vector
        pad_qkv = pad_qkv.contiguous()  # differentiable: the gradient flows back to the strided view
    fn = _window_ops.get("shifted_window_attention", name)
    return fn(qkv, num_heads, ws, ss, bias_table, scale, pad_qkv, bool(roll_before_pad))


# ------------------------------------------------------------------------- ViL neighbourhood attention


def neighborhood_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    window_size: int,
    global_k: torch.Tensor | None = None,
    global_v: torch.Tensor | None = None,
    local_bias_table: torch.Tensor | None = None,
    global_bias: torch.Tensor | None = None,
    neighbor: int = 0,
    scale: float | None = None,
    exact: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Vision Longformer's local-query attention (the official ``Long2DSCSelfAttention``): each query of a
    w x w window attends to the keys of its 3x3 neighbourhood of windows plus the global tokens.

    Args:
        q, k, v: (B, H, W, C) query / key / value maps of the local tokens, C = num_heads * head_dim; q is
            not pre-scaled. Strided views (e.g. slices of one Linear's output) are read in place by the
            fused backend when their last dim has unit stride.
        num_heads: heads; window_size: w (the map is zero-padded right/bottom to a multiple of w).
        global_k, global_v: (B, G, C) keys / values of the G global tokens as the local queries see them
            (the official code takes them from the same ``kv`` Linear as the local ones); both or neither.
        local_bias_table: ((4w-1)^2, heads) relative-position bias table (official index, see
            :mod:`esvit_kernels.reference.neighborhood`).
        global_bias: (heads, G) added to the local-query -> global-key logits (official
            ``g2l_relative_position_bias[1]``).
        neighbor: official ``mode``: 0 = full 3x3 neighbourhood; k in 1..8 = own window plus neighbour k
            (row-major over the 8 neighbours: 1 = up-left, 2 = up, 3 = up-right, 4 = left, 5 = right,
            6 = down-left, 7 = down, 8 = down-right); -1 = own window only.
        scale: logit scale, default head_dim ** -0.5.
        exact: official ``mask_invalid_locations`` mode: 0 = blockwise with zero padding (ViL's
            ``SW_EXACT: 0``, the default), -1 = blockwise with cyclic padding, 1 = exact sliding window
            (neighbor 0 only).
        backend: "auto" | "triton" | "torch" ("cuda" has no kernel for this op: a clear error).

    Returns:
        (B, H, W, C) attention output of the local queries (before the output projection), q's dtype.
        Softmax runs jointly over [global keys, local keys].
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, ndim=4)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape (B, H, W, C), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    check_same({"q": q, "k": k, "v": v})
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
        raise ValueError(f"window_size must be a positive int, got {window_size!r}")
    b, h, w, c = q.shape
    if c % num_heads != 0:
        raise ValueError(f"C={c} must be a multiple of num_heads={num_heads}")
    check_sizes("neighborhood_window_attention", "H, W >= 1 and head_dim = C / num_heads >= 1 in q (B, H, W, C)",
                H=h, W=w, head_dim=c // num_heads)
    if neighbor not in NEIGHBOR_MODES or isinstance(neighbor, bool):
        raise ValueError(f"neighbor must be one of {NEIGHBOR_MODES} (official mode numbering), got {neighbor!r}")
    if exact not in EXACT_MODES or isinstance(exact, bool):
        raise ValueError(f"exact must be one of {EXACT_MODES} (official mask_invalid_locations), got {exact!r}")
    if exact == 1 and neighbor != 0:
        raise ValueError(f"exact=1 (exact sliding window) is defined only for neighbor=0, got neighbor={neighbor}")
    if (global_k is None) != (global_v is None):
        raise ValueError("global_k and global_v must be given together")
    g = 0
    if global_k is not None:
        check_tensor(global_k, "global_k", ndim=3)
        check_tensor(global_v, "global_v", ndim=3)
        if global_k.shape != global_v.shape or global_k.shape[0] != b or global_k.shape[2] != c:
            raise ValueError(f"global_k and global_v must both have shape (B={b}, G, C={c}), got "
                             f"{tuple(global_k.shape)} and {tuple(global_v.shape)}")
        check_same({"q": q, "global_k": global_k, "global_v": global_v})
        g = global_k.shape[1]
        if g == 0:
            global_k = global_v = None
    if local_bias_table is not None:
        check_tensor(local_bias_table, "local_bias_table", ndim=2)
        want = ((4 * window_size - 1) ** 2, num_heads)
        if tuple(local_bias_table.shape) != want:
            raise ValueError(f"local_bias_table must have shape ((4w-1)^2, heads) = {want} for window "
                             f"{window_size} and {num_heads} heads, got {tuple(local_bias_table.shape)}")
        check_same({"q": q, "local_bias_table": local_bias_table}, dtype=False)
    if global_bias is not None:
        check_tensor(global_bias, "global_bias", ndim=2)
        if tuple(global_bias.shape) != (num_heads, g):
            raise ValueError(f"global_bias must have shape (heads, G) = {(num_heads, g)}, got "
                             f"{tuple(global_bias.shape)}" + ("" if g else " (no global tokens given)"))
        check_same({"q": q, "global_bias": global_bias}, dtype=False)
        if g == 0:
            global_bias = None
    hd = c // num_heads
    scale = hd**-0.5 if scale is None else float(scale)
    name = backend_name(backend, q.device.type, "neighborhood_window_attention")
    if name == "torch":
        return reference.neighborhood_window_attention(q, k, v, num_heads, window_size, global_k, global_v,
                                                       local_bias_table, global_bias, neighbor, scale, exact)
    if hd > 128 or window_size > 16:
        raise ValueError(f"neighborhood_window_attention: the {name} backend takes head_dim <= 128 and window_size "
                         f"<= 16 (got {hd} and {window_size}); use backend='torch'")
    for t, tn in ((q, "q"), (k, "k"), (v, "v"), (global_k, "global_k"), (global_v, "global_v")):
        if t is not None:
            _check_unit_stride(t, tn, name)
    fn = _neighborhood_ops.get("neighborhood_window_attention", name)
    return fn(q, k, v, num_heads, window_size, global_k, global_v, local_bias_table, global_bias, neighbor,
              scale, exact)


def global_token_attention(
    q_g: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """ViL's global-query path: G global queries q_g (B, G, C) attend densely to all N tokens k, v (B, N, C)
    (official order: the G global tokens first, then the local ones) with an optional (heads, G, N) bias
    (official ``cat([g2g_relative_position_bias, g2l_relative_position_bias[0] expanded])``); q_g is not
    pre-scaled (scale defaults to head_dim ** -0.5). Returns (B, G, C).

    A tiny dense attention: plain torch math on every device and backend (no fused kernel).
    """
    check_tensor(q_g, "q_g", ndim=3)
    check_tensor(k, "k", ndim=3)
    check_tensor(v, "v", ndim=3)
    check_same({"q_g": q_g, "k": k, "v": v})
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    b, g, c = q_g.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != c:
        raise ValueError(f"k and v must both have shape (B={b}, N, C={c}), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if c % num_heads != 0:
        raise ValueError(f"C={c} must be a multiple of num_heads={num_heads}")
    check_sizes("global_token_attention", "N >= 1 keys and head_dim >= 1", N=k.shape[1], head_dim=c // num_heads)
    if bias is not None:
        check_tensor(bias, "bias", ndim=3)
        if tuple(bias.shape) != (num_heads, g, k.shape[1]):
            raise ValueError(f"bias must have shape (heads, G, N) = {(num_heads, g, k.shape[1])}, got "
                             f"{tuple(bias.shape)}")
        check_same({"q_g": q_g, "bias": bias}, dtype=False)
    scale = (c // num_heads) ** -0.5 if scale is None else float(scale)
    return reference.global_token_attention(q_g, k, v, num_heads, bias, scale)


# ----------------------------------------------------------------------------------------- losses


def _loss_op(op: str, backend: str, device: torch.device):
    """The fused implementation of ``op`` for the resolved backend, or None for the torch reference."""
    name = backend_name(backend, device.type, op)
    return None if name == "torch" else _loss_ops.get(op, name)


def region_match(
    student_feats: torch.Tensor, teacher_feats: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """For each student region token, the index of the most cosine-similar teacher token.

    student_feats (B, Ts, D), teacher_feats (B, Tt, D), one dtype -> LongTensor (B, Ts). Ties (equal
    similarities, e.g. duplicate teacher tokens) resolve to the lowest teacher index. A NaN similarity wins,
    as NaN does in ``torch.max`` (lowest index first; a token whose similarities are all NaN gets 0): the
    result is always in [0, Tt), and a NaN feature reaches the loss as a non-finite value instead of being
    matched around or becoming a bad index. No gradient flows through the matching. The fused backends
    never write the B x Ts x Tt similarity matrix. B = 0 or Ts = 0 gives an empty result; Tt = 0 or D = 0
    is a ValueError.
    """
    check_tensor(student_feats, "student_feats", ndim=3)
    check_tensor(teacher_feats, "teacher_feats", ndim=3)
    check_same({"student_feats": student_feats, "teacher_feats": teacher_feats})
    if student_feats.shape[0] != teacher_feats.shape[0] or student_feats.shape[2] != teacher_feats.shape[2]:
        raise ValueError(f"student_feats (B, Ts, D) and teacher_feats (B, Tt, D) must agree on B and D, got "
                         f"{tuple(student_feats.shape)} and {tuple(teacher_feats.shape)}")
    check_sizes("region_match", "Tt >= 1 teacher tokens and D >= 1 features in teacher_feats (B, Tt, D)",
                Tt=teacher_feats.shape[1], D=teacher_feats.shape[2])
    fn = _loss_op("region_match", backend, student_feats.device)
    if fn is None:
        return reference.region_match(student_feats.detach(), teacher_feats.detach())
    return fn(student_feats.detach(), teacher_feats.detach())


_EMPTY_MEAN = "the loss of an empty input is undefined: skip the call for it"


def _check_center(center: torch.Tensor, k: int, ref: torch.Tensor) -> torch.Tensor:
    """The center as the backends take it: any float dtype, float64 made float32 here (every backend reads
    the center in float32, so this changes no result)."""
    check_tensor(center, "center", dtypes=CENTER_DTYPES)
    if center.numel() != k or center.dim() not in (1, 2) or (center.dim() == 2 and center.shape[0] != 1):
        raise ValueError(f"center must have shape ({k},) or (1, {k}), got {tuple(center.shape)}")
    check_same({"logits": ref, "center": center}, dtype=False)
    return center.float() if center.dtype == torch.float64 else center


def _check_match_range(match_index: torch.Tensor, tt: int) -> None:
    """Out-of-range indices would make the fused kernels read out of bounds. Eagerly: a ValueError (one host
    sync); under torch.compile: an asynchronous device assert, so the graph has no break."""
    if not match_index.numel():
        return
    if torch.compiler.is_compiling():
        torch._assert_async(((match_index >= 0) & (match_index < tt)).all(),
                            f"region_loss: match_index values must lie in [0, Tt={tt})")
        return
    lo, hi = torch.stack(torch.aminmax(match_index)).tolist()
    if lo < 0 or hi >= tt:
        raise ValueError(f"match_index values must lie in [0, Tt={tt}), got range [{lo}, {hi}]")


def _teacher_mean(teacher_logits: torch.Tensor) -> torch.Tensor:
    """(1, K) float32 mean of every teacher row: the batch statistic of the center EMA."""
    return reference.losses.teacher_mean(teacher_logits)


def region_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    match_index: torch.Tensor,
    center: torch.Tensor,
    *,
    student_temp: float,
    teacher_temp: float,
    backend: str = "auto",
) -> torch.Tensor:
    """EsViT's region loss L_R for one crop pair (scalar, gradient to the student logits only).

    mean over (b, i) of -sum_k softmax((t[b, m[b, i]] - center) / teacher_temp)_k
    * log_softmax(s[b, i] / student_temp)_k; student (B, Ts, K), teacher (B, Tt, K) of one dtype, match
    (B, Ts) int32/int64 in [0, Tt), center (K,) or (1, K) of any float dtype; temperatures > 0.
    B, Ts, Tt and K must be >= 1 (a mean over no token is undefined: ValueError). A NaN in the inputs gives
    a NaN loss.
    """
    check_tensor(student_logits, "student_logits", ndim=3)
    check_tensor(teacher_logits, "teacher_logits", ndim=3)
    b, ts, k = student_logits.shape
    if teacher_logits.shape[0] != b or teacher_logits.shape[2] != k:
        raise ValueError(f"teacher_logits must be (B={b}, Tt, K={k}), got {tuple(teacher_logits.shape)}")
    if not isinstance(match_index, torch.Tensor) or match_index.shape != (b, ts):
        raise ValueError(f"match_index must be a tensor of shape (B, Ts) = {(b, ts)}")
    if match_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"match_index must be int64 or int32, got {match_index.dtype}")
    check_same({"student_logits": student_logits, "teacher_logits": teacher_logits})
    check_same({"student_logits": student_logits, "match_index": match_index}, dtype=False)
    check_sizes("region_loss", "B, Ts, Tt, K >= 1 in student_logits (B, Ts, K) and teacher_logits (B, Tt, K)",
                _EMPTY_MEAN, B=b, Ts=ts, Tt=teacher_logits.shape[1], K=k)
    center = _check_center(center, k, student_logits)
    student_temp = check_temperature(student_temp, "student_temp")
    teacher_temp = check_temperature(teacher_temp, "teacher_temp")
    _check_match_range(match_index, teacher_logits.shape[1])
    fn = _loss_op("region_loss", backend, student_logits.device)
    if fn is None:
        return reference.region_loss(student_logits, teacher_logits, match_index, center,
                                     student_temp, teacher_temp)
    return fn(student_logits, teacher_logits, match_index, center, student_temp, teacher_temp)


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    *,
    student_temp: float,
    teacher_temp: float,
    return_teacher_mean: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """EsViT/DINO view loss L_V: student (S, B, K) crops, teacher (T, B, K) global crops of the same dtype
    (the first T student crops are the same views); mean over pairs (t, v != t) of the batch-mean
    cross-entropy. With ``return_teacher_mean`` also returns the (1, K) float32 mean of the T*B teacher
    rows (the view center's batch statistic; the fused backend gets it from the loss's own pass). B = 0 or
    K = 0 is a ValueError."""
    check_tensor(student_logits, "student_logits", ndim=3)
    check_tensor(teacher_logits, "teacher_logits", ndim=3)
    s, b, k = student_logits.shape
    t = teacher_logits.shape[0]
    if teacher_logits.shape[1:] != (b, k):
        raise ValueError(f"teacher_logits must be (T, B={b}, K={k}), got {tuple(teacher_logits.shape)}")
    if t < 1 or s < 1 or t * s - min(t, s) < 1:
        raise ValueError(f"need at least one (teacher, student) pair with different crops, got T={t}, S={s}")
    check_same({"student_logits": student_logits, "teacher_logits": teacher_logits})
    check_sizes("dino_loss", "B, K >= 1 in the logits (S, B, K) and (T, B, K)", _EMPTY_MEAN, B=b, K=k)
    center = _check_center(center, k, student_logits)
    student_temp = check_temperature(student_temp, "student_temp")
    teacher_temp = check_temperature(teacher_temp, "teacher_temp")
    fn = _loss_op("dino_loss", backend, student_logits.device)
    if fn is None:
        loss = reference.dino_loss(student_logits, teacher_logits, center, student_temp, teacher_temp)
        return (loss, _teacher_mean(teacher_logits)) if return_teacher_mean else loss
    if return_teacher_mean:
        return fn(student_logits, teacher_logits, center, student_temp, teacher_temp, want_mean=True)
    return fn(student_logits, teacher_logits, center, student_temp, teacher_temp)


def multi_region_loss(
    student_logits: Sequence[torch.Tensor],
    student_feats: Sequence[torch.Tensor],
    teacher_logits: torch.Tensor,
    teacher_feats: torch.Tensor,
    center: torch.Tensor,
    *,
    student_temp: float,
    teacher_temp: float,
    return_teacher_mean: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Region matching + L_R over every (teacher view t, student crop v != t) pair in few launches.

    Args:
        student_logits: groups of crops of equal resolution, in crop order, each (V_g, B, T_g, K)
            (e.g. 2 global crops with T_g=49 and 8 local crops with T_g=9); one dtype with teacher_logits.
        student_feats: the matching backbone region tokens, each (V_g, B, T_g, D); one dtype with
            teacher_feats.
        teacher_logits: (T, B, Tt, K) region-head outputs of the teacher's views (= the first T crops).
        teacher_feats: (T, B, Tt, D) teacher backbone region tokens.
        center: (K,) or (1, K) region center.
        return_teacher_mean: also return the (1, K) float32 mean over all T*B*Tt teacher region tokens
            (the region center's batch statistic), computed in the teacher-statistics pass when fused.
    Returns:
        mean over the pairs of :func:`region_loss` with the :func:`region_match` matching (and the mean);
        non-finite when a NaN reaches the features or logits (the matching stays in range). Empty sizes
        (B, Tt, K, D or a group's T = 0) are a ValueError.
        The fused backend launches one teacher-statistics kernel, then per group one matching kernel and
        one loss kernel for all of the group's crops and teacher views (and one backward kernel).
    """
    check_tensor(teacher_logits, "teacher_logits", ndim=4)
    check_tensor(teacher_feats, "teacher_feats", ndim=4)
    t, b, tt, k = teacher_logits.shape
    if teacher_feats.shape[:3] != (t, b, tt):
        raise ValueError(f"teacher_feats must be (T={t}, B={b}, Tt={tt}, D), got {tuple(teacher_feats.shape)}")
    d = teacher_feats.shape[3]
    check_sizes("multi_region_loss", "B, Tt, K, D >= 1 in teacher_logits (T, B, Tt, K) and teacher_feats "
                "(T, B, Tt, D)", _EMPTY_MEAN, B=b, Tt=tt, K=k, D=d)
    if len(student_logits) != len(student_feats) or not len(student_logits):
        raise ValueError("student_logits and student_feats must be non-empty sequences of the same length")
    for gi, (sl, sf) in enumerate(zip(student_logits, student_feats)):
        check_tensor(sl, f"student_logits[{gi}]", ndim=4)
        check_tensor(sf, f"student_feats[{gi}]", ndim=4)
        if sl.shape[1] != b or sl.shape[3] != k or sf.shape[:3] != sl.shape[:3] or sf.shape[3] != d:
            raise ValueError(f"group {gi}: student_logits must be (V, B={b}, T, K={k}) and student_feats "
                             f"(V, B, T, D={d}), got {tuple(sl.shape)} and {tuple(sf.shape)}")
        check_same({"teacher_logits": teacher_logits, f"student_logits[{gi}]": sl})
        check_same({"teacher_feats": teacher_feats, f"student_feats[{gi}]": sf})
        check_same({"teacher_logits": teacher_logits, f"student_feats[{gi}]": sf}, dtype=False)
        check_sizes("multi_region_loss", "T >= 1 tokens in every student group (V, B, T, K)", _EMPTY_MEAN,
                    **{f"T of group {gi}": sl.shape[2]})
    n_crops = sum(sl.shape[0] for sl in student_logits)
    if n_crops * t - min(n_crops, t) < 1:
        raise ValueError("need at least one (teacher, student) pair with different crops")
    center = _check_center(center, k, teacher_logits)
    student_temp = check_temperature(student_temp, "student_temp")
    teacher_temp = check_temperature(teacher_temp, "teacher_temp")
    fn = _loss_op("multi_region_loss", backend, teacher_logits.device)
    if fn is None:
        loss = reference.multi_region_loss(student_logits, student_feats, teacher_logits, teacher_feats,
                                           center, student_temp, teacher_temp)
        return (loss, _teacher_mean(teacher_logits)) if return_teacher_mean else loss
    args = (list(student_logits), list(student_feats), teacher_logits, teacher_feats, center, student_temp,
            teacher_temp)
    return fn(*args, want_mean=True) if return_teacher_mean else fn(*args)
