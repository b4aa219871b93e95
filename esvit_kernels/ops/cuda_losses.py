"""CUDA-backend loss ops from ``esvit_kernels._C`` (namespace ``esvit_cuda``, schemas defined in C++ by
``csrc/ops.cpp``): their fake (meta) implementations for ``torch.compile`` and ``get(op)`` for
``esvit_kernels.ops.losses.get(op, "cuda")``.

``region_match(Tensor student, Tensor teacher) -> Tensor``
    student (B, Ts, D), teacher (B, Tt, D), any float dtypes (mixed dtypes compare in float32) ->
    (B, Ts) int64: for each student token the index of the most cosine-similar teacher token, ties to the
    lowest index. No gradient (the matching is not differentiable).
"""

from __future__ import annotations

import importlib

import torch

from ..backends import OP_BACKENDS, BackendUnavailableError

__all__ = ["get"]


def _region_match_fake(student, teacher):
    return student.new_empty(student.shape[0], student.shape[1], dtype=torch.int64)


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
        _registered = True
    return torch.ops.esvit_cuda


def get(op: str):
    """The CUDA implementation of loss op ``op``, with the positional signature functional.py calls."""
    if op == "region_match":
        ops = _ops()

        def region_match(student_feats, teacher_feats):
            return ops.region_match(student_feats, teacher_feats)

        return region_match
    if op in OP_BACKENDS and "cuda" not in OP_BACKENDS[op]:
        raise BackendUnavailableError(f"{op}: the cuda backend has no kernel for this op "
                                      f"(it has: {', '.join(OP_BACKENDS[op])})")
    raise BackendUnavailableError(f"{op}: no CUDA kernel for this op")
