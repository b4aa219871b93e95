"""Input validation shared by the public ops: every bad input gets a clear ``ValueError``/``TypeError``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CENTER_DTYPES = FLOAT_DTYPES + (torch.float64,)  # a loss center: a constant, read in float32 by every backend


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(7, 5) -> (7, 5)``; anything else is an error."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def check_tensor(
    x: torch.Tensor, name: str, *, ndim: int | None = None, float_dtype: bool = True,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if float_dtype and x.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        raise TypeError(f"{name} must be {', '.join(names[:-1])} or {names[-1]}, got {x.dtype}")


def check_sizes(op: str, what: str, hint: str = "", **sizes: int) -> None:
    """Every given size >= 1, else one ValueError naming the empty ones (an op that cannot mean anything on
    an empty input says so instead of dividing by zero or returning NaN)."""
    empty = [f"{k}={v}" for k, v in sizes.items() if v < 1]
    if empty:
        raise ValueError(f"{op} needs {what}, got {', '.join(empty)}" + (f"; {hint}" if hint else ""))


def check_same(tensors: dict[str, torch.Tensor | None], *, dtype: bool = True) -> None:
    """All given tensors on one device (and, with ``dtype``, of one dtype)."""
    present = {k: v for k, v in tensors.items() if v is not None}
    names = list(present)
    first = present[names[0]]
    for name in names[1:]:
        t = present[name]
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {first.device}")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {names[0]} has {first.dtype}")


def check_temperature(value: float, name: str) -> float:
    value = float(value)
    if not value > 0.0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value
