"""Backend availability and selection.

Three backends implement every op behind one functional API:

* ``torch``  -- the eager PyTorch reference (``esvit_kernels.reference``); always available, the oracle.
* ``triton`` -- fused Triton kernels; needs ``triton`` and either a CUDA device or ``TRITON_INTERPRET=1``
  (the Triton interpreter, which runs the same kernels on CPU tensors, slowly; that is how CI tests them).
* ``cuda``   -- hand-written CUDA C++ kernels in the compiled extension ``esvit_kernels._C``; needs the
  extension and a CUDA device.

``"auto"`` picks the fastest backend available for the tensors' device and logs its choice once per
(op, device); :func:`resolve_backend` returns the choice and the reason. A backend asked for by name that
cannot run raises :class:`BackendUnavailableError` with the reason -- never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass

import torch

__all__ = [
    "BACKENDS",
    "OP_BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "available_backends",
    "backend_name",
    "resolve_backend",
    "triton_interpreting",
]

BACKENDS = ("triton", "cuda", "torch")

# Preference order of "auto" on a CUDA device. Measured on a GPU it should be the faster first; until a
# GPU run says otherwise the Triton kernels (the more widely tested backend) come first.
AUTO_ORDER_CUDA = ("triton", "cuda", "torch")

# Which backends implement each op (a backend missing here fails with a clear message when named,
# and "auto" skips it for that op).
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "window_attention": ("triton", "cuda", "torch"),
    "shifted_window_attention": ("triton", "cuda", "torch"),
    "neighborhood_window_attention": ("triton", "torch"),
    "region_match": ("triton", "cuda", "torch"),
    "region_loss": ("triton", "cuda", "torch"),
    "multi_region_loss": ("triton", "torch"),
    "dino_loss": ("triton", "torch"),
}

_log = logging.getLogger("esvit_kernels")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run, on which devices, and why (not)."""

    name: str
    available: bool
    reason: str
    devices: tuple[str, ...] = ()


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def _triton_import() -> tuple[bool, str]:
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


@functools.lru_cache(maxsize=1)
def _cuda_ext_import() -> tuple[bool, str]:
    try:
        importlib.import_module("esvit_kernels._C")
    except Exception as exc:
        return False, (
            "the CUDA extension esvit_kernels._C is not built or does not load "
            f"({type(exc).__name__}: {exc}); build it with `python setup.py build_ext --inplace` "
            "and a CUDA toolkit (CUDA_HOME)"
        )
    return True, "esvit_kernels._C loaded"


def _status(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus("torch", True, "eager PyTorch reference, runs everywhere", ("cpu", "cuda"))
    if name == "triton":
        ok, why = _triton_import()
        if not ok:
            return BackendStatus("triton", False, why)
        devices = []
        if torch.cuda.is_available():
            devices.append("cuda")
        if triton_interpreting():
            devices.append("cpu")
        if not devices:
            return BackendStatus(
                "triton", False, f"{why} is installed but there is no CUDA device (set TRITON_INTERPRET=1 to "
                "run the kernels on the CPU through the Triton interpreter)"
            )
        extra = " (interpreter on CPU)" if "cpu" in devices else ""
        return BackendStatus("triton", True, why + extra, tuple(devices))
    if name == "cuda":
        ok, why = _cuda_ext_import()
        if not ok:
            return BackendStatus("cuda", False, why)
        if not torch.cuda.is_available():
            return BackendStatus("cuda", False, "esvit_kernels._C is built but there is no CUDA device")
        return BackendStatus("cuda", True, why, ("cuda",))
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS + ('auto',)}")


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is available here, on which devices, and why (not)."""
    return {name: _status(name) for name in BACKENDS}


_announced: set[tuple[str, str, str]] = set()


@torch.compiler.assume_constant_result
def backend_name(backend: str, device_type: str, op: str) -> str:
    """:func:`resolve_backend`'s name only; a constant to ``torch.compile`` (no tracing into imports)."""
    return resolve_backend(backend, device_type, op)[0]


def resolve_backend(backend: str, device: torch.device | str, op: str = "op") -> tuple[str, str]:
    """Turn ``backend`` (a name or ``"auto"``) into a backend that can run ``op`` on ``device``.

    Returns ``(name, reason)``. A named backend that cannot run on ``device`` raises
    :class:`BackendUnavailableError`. ``"auto"`` picks Triton or CUDA on a CUDA device and the torch
    reference on the CPU (the Triton interpreter is for testing, not speed), and logs the choice once.
    """
    device = torch.device(device)
    supported = OP_BACKENDS.get(op, BACKENDS)
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {BACKENDS + ('auto',)}")
        if backend not in supported:
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} has no kernel for this op (it has: {', '.join(supported)})"
            )
        status = _status(backend)
        if not status.available:
            raise BackendUnavailableError(f"{op}: backend {backend!r} is unavailable: {status.reason}")
        if device.type not in status.devices:
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} cannot run on {device.type} tensors (it runs on "
                f"{', '.join(status.devices)}; {status.reason})"
            )
        return backend, f"{backend} requested"
    if device.type == "cuda":
        for name in AUTO_ORDER_CUDA:
            if name not in supported:
                continue
            status = _status(name)
            if status.available and "cuda" in status.devices:
                reason = f"auto on cuda -> {name} ({status.reason})"
                break
    else:
        name, reason = "torch", f"auto on {device.type} -> torch (fused kernels need a CUDA device)"
    key = (op, device.type, name)
    if key not in _announced:
        _announced.add(key)
        _log.info("esvit_kernels: %s uses backend %r: %s", op, name, reason)
    return name, reason
