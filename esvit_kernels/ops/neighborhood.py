"""Fused implementations of ViL's neighbourhood window attention (filled in by the Triton backend)."""

from __future__ import annotations

from ..backends import BackendUnavailableError

__all__ = ["get"]


def get(op: str, backend: str):
    """The fused implementation of ``op`` for ``backend``."""
    raise BackendUnavailableError(f"{op}: no fused implementation for backend {backend!r}")
