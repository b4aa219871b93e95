"""CUDA-backend loss ops from ``esvit_kernels._C`` (namespace ``esvit_cuda``, schemas defined in C++ by
``csrc/ops.cpp``): their fake (meta) implementations for ``torch.compile`` and ``get(op)`` for
``esvit_kernels.ops.losses.get(op, "cuda")``.

``region_match(Tensor student, Tensor teacher) -> Tensor``
    student (B, Ts, D), teacher (B, Tt, D), any float dtypes (mixed dtypes compare in float32) ->
    (B, Ts) int64: for each student token the index of the most cosine-similar teacher token, ties to the
    lowest index. No gradient (the matching is not differentiable).

``region_loss_fwd(Tensor student, Tensor teacher, Tensor match, Tensor center, float student_temp,
float teacher_temp) -> (Tensor loss, Tensor stats)``
    student (B, Ts, K), teacher (B, Tt, K) of one dtype, match (B, Ts) int32/int64 in [0, Tt) (not checked
    here: functional.region_loss does), center K elements of any float dtype -> loss () float32 = mean over
    (b, i) of CE(softmax((teacher[b, match[b, i]] - center) / teacher_temp), log_softmax(student[b, i] /
    student_temp)); stats (B*Ts, 2) float32, the per-row base-2 log-sum-exps the backward reuses.
``region_loss_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor match, Tensor center, Tensor stats,
float student_temp, float teacher_temp) -> Tensor``
    the gradient with respect to ``student`` (its dtype; contiguous). The teacher, center and matching get
    none, as in the reference.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

from ..backends import OP_BACKENDS, BackendUnavailableError

__all__ = ["get"]


def _region_match_fake(student, teacher):
    return student.new_empty(student.shape[0], student.shape[1], dtype=torch.int64)


def _region_loss_fwd_fake(student, teacher, match, center, student_temp, teacher_temp):
    rows = student.shape[0] * student.shape[1]
    return student.new_empty((), dtype=torch.float32), student.new_empty(rows, 2, dtype=torch.float32)


def _region_loss_bwd_fake(grad_loss, student, *args):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _region_loss_setup(ctx, inputs, output):
    student, teacher, match, center, student_temp, teacher_temp = inputs
    ctx.temps = (student_temp, teacher_temp)
    ctx.save_for_backward(student, teacher, match, center, output[1])


def _region_loss_backward(ctx, grad_loss, _grad_stats):
    student, teacher, match, center, stats = ctx.saved_tensors
    dstudent = torch.ops.esvit_cuda.region_loss_bwd(grad_loss, student, teacher, match, center, stats, *ctx.temps)
    return dstudent, None, None, None, None, None


_registered = False


def _ops():
    """``torch.ops.esvit_cuda`` with the fake impls registered (once); a clear error without ``_C``."""
    global _registered
    if not _registered:
        try:
            importlib.import_module("esvit_kernels._C")
        except Exception as exc:
            raise BackendUnavailableError(f"the cuda backend is unavailable: esvit_kernels._C does not load "
                                          f"({type(exc).__name__}: {exc})") from exc
        torch.library.register_fake("esvit_cuda::region_match", _region_match_fake)
        torch.library.register_fake("esvit_cuda::region_loss_fwd", _region_loss_fwd_fake)
        torch.library.register_fake("esvit_cuda::region_loss_bwd", _region_loss_bwd_fake)
        torch.library.register_autograd("esvit_cuda::region_loss_fwd", _region_loss_backward,
                                        setup_context=_region_loss_setup)
        _registered = True
    return torch.ops.esvit_cuda


def get(op: str):
    """The CUDA implementation of loss op ``op``, with the positional signature functional.py calls."""
    if op == "region_match":
        ops = _ops()

        def region_match(student_feats, teacher_feats):
            return ops.region_match(student_feats, teacher_feats)

        return region_match
    if op == "region_loss":
        ops = _ops()

        def region_loss(student_logits, teacher_logits, match_index, center, student_temp, teacher_temp):
            if student_logits.dtype != teacher_logits.dtype:  # compare mixed precisions in float32
                student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
            return ops.region_loss_fwd(student_logits.contiguous(), teacher_logits.contiguous(), match_index,
                                       center, float(student_temp), float(teacher_temp))[0]

        return region_loss
    if op in OP_BACKENDS and "cuda" not in OP_BACKENDS[op]:
        raise BackendUnavailableError(f"{op}: the cuda backend has no kernel for this op "
                                      f"(it has: {', '.join(OP_BACKENDS[op])})")
    raise BackendUnavailableError(f"{op}: no CUDA kernel for this op")


# csrc/ops.cpp points torch at this module for these ops' fakes (set_python_module): register them on import
# whenever the extension is built, so torch.ops.esvit_cuda.* works under torch.compile even when called
# directly rather than through get().
with contextlib.suppress(BackendUnavailableError):
    _ops()
