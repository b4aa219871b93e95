"""Per-iteration schedules as DINO / EsViT compute them (numpy arrays indexed by the global iteration)."""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_scheduler", "teacher_temp_schedule"]


def cosine_scheduler(
    base_value: float, final_value: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Linear warmup from ``start_warmup_value`` to ``base_value`` over ``warmup_epochs``, then a cosine from
    ``base_value`` to ``final_value``; one value per iteration (``epochs * niter_per_ep`` of them)."""
    if epochs < 1 or niter_per_ep < 1:
        raise ValueError(f"need epochs >= 1 and niter_per_ep >= 1, got {epochs}, {niter_per_ep}")
    warmup_epochs = min(max(int(warmup_epochs), 0), epochs)
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cos = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup, cos))


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear from ``warmup_temp`` to ``temp`` over ``warmup_epochs``
    (``np.linspace``, so epoch ``warmup_epochs - 1`` already reaches ``temp``), then constant."""
    warmup_epochs = min(max(int(warmup_epochs), 0), epochs)
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.full(epochs - warmup_epochs, temp)))
