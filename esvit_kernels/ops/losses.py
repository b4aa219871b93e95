"""Custom ops for EsViT's region matching and losses: schemas, fake (meta) implementations and autograd
for the Triton kernels (namespace ``esvit_triton``), plus the entry points behind the functional API.

Ops (all logits/teacher inputs contiguous; ``lse2`` = log2-sum-exp2 of logits * log2(e) / temperature):

``region_match(Tensor student, Tensor teacher, int crop_offset) -> Tensor``
    student (V, B, Ts, D), teacher (T, B, Tt, D) -> (T, V, B, Ts) int64 argmax of the cosine similarity,
    lowest index on ties; the pairs t == crop_offset + v are skipped (left 0).
``teacher_stats(Tensor teacher, Tensor center, float teacher_temp, bool want_mean) -> (lse2, mean)``
    teacher (..., K), center (K,) -> per-row lse2 of (t - c) / teacher_temp, float32 (R,); with
    ``want_mean`` the (1, K) float32 mean of the raw rows from the same pass (else empty).
``region_ce(student, teacher, teacher_lse2, center, match, int crop_offset, float student_temp,
float teacher_temp, float weight, bool fuse_grad) -> (loss, student_lse2, grad)``
    weight * sum over student rows (v, b, i) of (V, B, Ts, K) and teacher views t != crop_offset + v of
    CE(softmax((teacher[t, b, match[t, v, b, i]] - c) / tt), log_softmax(student[v, b, i] / ts)).
    Differentiable in ``student`` only. ``grad`` is the unit-upstream gradient when the forward could
    write it in the same pass (``fuse_grad`` and the row fits one block), else empty.
``region_ce_bwd(grad_loss, student, teacher, teacher_lse2, center, match, student_lse2, int crop_offset,
float student_temp, float teacher_temp, float weight) -> Tensor`` the second streaming pass.
``dino_ce(student, teacher, teacher_lse2, center, float student_temp, float teacher_temp, float weight,
bool fuse_grad) -> (loss, student_lse2, grad)``, ``dino_ce_bwd(...)``
    the same for the view loss: student (S, B, K) crops, teacher (T, B, K) views, every pair t != v.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import Tensor

from ..backends import BackendUnavailableError
from . import cuda_losses  # registers the CUDA loss ops' fakes/autograd when esvit_kernels._C is built

__all__ = ["get"]

_F32 = torch.float32


def _kernels():
    return importlib.import_module("esvit_kernels._triton.losses")


def _fuses(op: str, k: int, n_crops: int = 1) -> bool:
    return _kernels().fuses_grad(op, k, n_crops)


# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("esvit_triton::region_match", mutates_args=())
def _region_match(student: Tensor, teacher: Tensor, crop_offset: int) -> Tensor:
    return _kernels().region_match(student, teacher, crop_offset)


@_region_match.register_fake
def _(student, teacher, crop_offset):
    v, b, ts, _ = student.shape
    return student.new_empty((teacher.shape[0], v, b, ts), dtype=torch.int64)


@torch.library.custom_op("esvit_triton::teacher_stats", mutates_args=())
def _teacher_stats(teacher: Tensor, center: Tensor, teacher_temp: float, want_mean: bool) -> tuple[Tensor, Tensor]:
    return _kernels().teacher_stats(teacher, center, teacher_temp, want_mean)


@_teacher_stats.register_fake
def _(teacher, center, teacher_temp, want_mean):
    k = teacher.shape[-1]
    lse2 = teacher.new_empty(teacher.numel() // k, dtype=_F32)
    return lse2, teacher.new_empty((1, k) if want_mean else (0,), dtype=_F32)


@torch.library.custom_op("esvit_triton::region_ce", mutates_args=())
def _region_ce(
    student: Tensor, teacher: Tensor, teacher_lse2: Tensor, center: Tensor, match: Tensor, crop_offset: int,
    student_temp: float, teacher_temp: float, weight: float, fuse_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().region_ce_forward(student, teacher, teacher_lse2, center, match, crop_offset, student_temp,
                                        teacher_temp, weight, fuse_grad)


@_region_ce.register_fake
def _(student, teacher, teacher_lse2, center, match, crop_offset, student_temp, teacher_temp, weight, fuse_grad):
    v, b, ts, k = student.shape
    grad = torch.empty_like(student) if fuse_grad and _fuses("region", k) else student.new_empty(0)
    return student.new_empty((), dtype=_F32), student.new_empty(v * b * ts, dtype=_F32), grad


@torch.library.custom_op("esvit_triton::region_ce_bwd", mutates_args=())
def _region_ce_bwd(
    grad_loss: Tensor, student: Tensor, teacher: Tensor, teacher_lse2: Tensor, center: Tensor, match: Tensor,
    student_lse2: Tensor, crop_offset: int, student_temp: float, teacher_temp: float, weight: float,
) -> Tensor:
    return _kernels().region_ce_backward(grad_loss, student, teacher, teacher_lse2, center, match, student_lse2,
                                         crop_offset, student_temp, teacher_temp, weight)


@_region_ce_bwd.register_fake
def _(grad_loss, student, *args):
    return torch.empty_like(student)


@torch.library.custom_op("esvit_triton::dino_ce", mutates_args=())
def _dino_ce(
    student: Tensor, teacher: Tensor, teacher_lse2: Tensor, center: Tensor, student_temp: float,
    teacher_temp: float, weight: float, fuse_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().dino_ce_forward(student, teacher, teacher_lse2, center, student_temp, teacher_temp, weight,
                                      fuse_grad)


@_dino_ce.register_fake
def _(student, teacher, teacher_lse2, center, student_temp, teacher_temp, weight, fuse_grad):
    s, b, k = student.shape
    grad = torch.empty_like(student) if fuse_grad and _fuses("dino", k, s) else student.new_empty(0)
    return student.new_empty((), dtype=_F32), student.new_empty(s * b, dtype=_F32), grad


@torch.library.custom_op("esvit_triton::dino_ce_bwd", mutates_args=())
def _dino_ce_bwd(
    grad_loss: Tensor, student: Tensor, teacher: Tensor, teacher_lse2: Tensor, center: Tensor,
    student_lse2: Tensor, student_temp: float, teacher_temp: float, weight: float,
) -> Tensor:
    return _kernels().dino_ce_backward(grad_loss, student, teacher, teacher_lse2, center, student_lse2,
                                       student_temp, teacher_temp, weight)


@_dino_ce_bwd.register_fake
def _(grad_loss, student, *args):
    return torch.empty_like(student)


# ------------------------------------------------------------------------------ autograd wiring
# Only the student logits get a gradient: the teacher distribution, its statistics, the center and the
# matching are constants of the loss (the reference detaches them too).


def _region_setup(ctx, inputs, output):
    student, teacher, teacher_lse2, center, match, crop_offset, student_temp, teacher_temp, weight, fuse = inputs
    ctx.static = (crop_offset, student_temp, teacher_temp, weight)
    ctx.fused = fuse and _fuses("region", student.shape[-1])
    if ctx.fused:
        ctx.save_for_backward(output[2])
    else:
        ctx.save_for_backward(student, teacher, teacher_lse2, center, match, output[1])


def _region_backward(ctx, grad_loss, _g_lse, _g_grad):
    if ctx.fused:
        (grad,) = ctx.saved_tensors
        dstudent = grad * grad_loss
    else:
        student, teacher, teacher_lse2, center, match, student_lse2 = ctx.saved_tensors
        dstudent = torch.ops.esvit_triton.region_ce_bwd(grad_loss.float(), student, teacher, teacher_lse2, center,
                                                        match, student_lse2, *ctx.static)
    return (dstudent,) + (None,) * 9


def _dino_setup(ctx, inputs, output):
    student, teacher, teacher_lse2, center, student_temp, teacher_temp, weight, fuse = inputs
    ctx.static = (student_temp, teacher_temp, weight)
    ctx.fused = fuse and _fuses("dino", student.shape[-1], student.shape[0])
    if ctx.fused:
        ctx.save_for_backward(output[2])
    else:
        ctx.save_for_backward(student, teacher, teacher_lse2, center, output[1])


def _dino_backward(ctx, grad_loss, _g_lse, _g_grad):
    if ctx.fused:
        (grad,) = ctx.saved_tensors
        dstudent = grad * grad_loss
    else:
        student, teacher, teacher_lse2, center, student_lse2 = ctx.saved_tensors
        dstudent = torch.ops.esvit_triton.dino_ce_bwd(grad_loss.float(), student, teacher, teacher_lse2, center,
                                                      student_lse2, *ctx.static)
    return (dstudent,) + (None,) * 7


_region_ce.register_autograd(_region_backward, setup_context=_region_setup)
_dino_ce.register_autograd(_dino_backward, setup_context=_dino_setup)


# ------------------------------------------------------------------------------ entry points


def _wants_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _const(x: Tensor) -> Tensor:
    """A loss constant (teacher logits, center): detached and contiguous."""
    return x.detach().contiguous()


def region_match(student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
    """(B, Ts, D), (B, Tt, D) -> (B, Ts) int64; see :func:`esvit_kernels.region_match`."""
    return torch.ops.esvit_triton.region_match(_const(student_feats)[None], _const(teacher_feats)[None], 1)[0, 0]


def region_loss(student_logits: Tensor, teacher_logits: Tensor, match_index: Tensor, center: Tensor,
                student_temp: float, teacher_temp: float) -> Tensor:
    """L_R of one crop pair; see :func:`esvit_kernels.region_loss`."""
    b, ts, _ = student_logits.shape
    teacher, c = _const(teacher_logits), _const(center).reshape(-1)
    lse2, _ = torch.ops.esvit_triton.teacher_stats(teacher, c, teacher_temp, False)
    weight = 1.0 / (b * ts) if b * ts else float("nan")
    return torch.ops.esvit_triton.region_ce(
        student_logits.contiguous()[None], teacher[None], lse2, c, _const(match_index)[None, None], 1,
        student_temp, teacher_temp, weight, _wants_grad(student_logits),
    )[0]


def dino_loss(student_logits: Tensor, teacher_logits: Tensor, center: Tensor, student_temp: float,
              teacher_temp: float, *, want_mean: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """L_V over all pairs t != v; with ``want_mean`` also the (1, K) float32 teacher mean (same pass)."""
    s, b, _ = student_logits.shape
    t = teacher_logits.shape[0]
    teacher, c = _const(teacher_logits), _const(center).reshape(-1)
    lse2, mean = torch.ops.esvit_triton.teacher_stats(teacher, c, teacher_temp, want_mean)
    weight = 1.0 / ((t * s - min(t, s)) * b) if b else float("nan")
    loss = torch.ops.esvit_triton.dino_ce(student_logits.contiguous(), teacher, lse2, c, student_temp, teacher_temp,
                                          weight, _wants_grad(student_logits))[0]
    return (loss, mean) if want_mean else loss


def multi_region_loss(student_logits: Sequence[Tensor], student_feats: Sequence[Tensor], teacher_logits: Tensor,
                      teacher_feats: Tensor, center: Tensor, student_temp: float, teacher_temp: float, *,
                      want_mean: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """L_R over every (teacher view t, student crop v != t) pair: one teacher-statistics launch, then per
    group of equal-resolution crops one matching launch and one loss launch covering all its crops and
    both teachers (each student row is read once for all its pairs)."""
    t, b, _, _ = teacher_logits.shape
    teacher, c, tfeats = _const(teacher_logits), _const(center).reshape(-1), _const(teacher_feats)
    lse2, mean = torch.ops.esvit_triton.teacher_stats(teacher, c, teacher_temp, want_mean)
    n_crops = sum(g.shape[0] for g in student_logits)
    n_pairs = t * n_crops - min(t, n_crops)
    total, offset = None, 0
    for logits, feats in zip(student_logits, student_feats):
        v, _, tg, _ = logits.shape
        match = torch.ops.esvit_triton.region_match(_const(feats), tfeats, offset)
        weight = 1.0 / (n_pairs * b * tg) if b * tg else float("nan")
        loss = torch.ops.esvit_triton.region_ce(logits.contiguous(), teacher, lse2, c, match, offset, student_temp,
                                                teacher_temp, weight, _wants_grad(logits))[0]
        total = loss if total is None else total + loss
        offset += v
    return (total, mean) if want_mean else total


_TRITON = {
    "region_match": region_match,
    "region_loss": region_loss,
    "dino_loss": dino_loss,
    "multi_region_loss": multi_region_loss,
}


def get(op: str, backend: str):
    """The fused implementation of ``op`` for ``backend`` ("triton", or "cuda" from ``ops.cuda_losses``)."""
    if op not in _TRITON:
        raise ValueError(f"unknown loss op {op!r}; choose one of {sorted(_TRITON)}")
    if backend == "triton":
        return _TRITON[op]
    if backend == "cuda":
        return cuda_losses.get(op)
    raise BackendUnavailableError(f"{op}: no fused implementation for backend {backend!r}")
