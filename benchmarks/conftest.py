"""Shared fixture of the pytest-benchmark regression suite (``pytest benchmarks/ --benchmark-only``).

These tests reuse the providers of ``python -m benchmarks`` on a few representative shapes so that
pytest-benchmark can store and compare runs (``--benchmark-autosave``, ``--benchmark-compare``). They time
wall clock around a synchronised call, so they track regressions; the figures to quote come from
``python -m benchmarks`` (CUDA events, L2 flush). ``make test`` runs ``pytest tests`` and never collects
this folder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from benchmarks.harness import L2_FLUSH_BYTES, classify_failure, free_memory, make_bench
from benchmarks.suite import Provider

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ROUNDS, WARMUP = (50, 10) if DEVICE.type == "cuda" else (3, 1)


@pytest.fixture
def measure(benchmark) -> Callable[[Provider, Any, str], None]:
    """``measure(provider, inputs, mode)``: skip with the provider's reason, else benchmark one mode."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=DEVICE) if DEVICE.type == "cuda" else None

    def sync() -> None:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    def run(prov: Provider, inputs: Any, mode: str) -> None:
        reason = prov.check(inputs, mode)
        if reason:
            pytest.skip(reason)
        if prov.compiles and DEVICE.type != "cuda":
            pytest.skip("torch.compile on the CPU is too slow for regression tracking")
        try:
            fwd = prov.build(inputs)
            bench = make_bench(fwd.fn, fwd.params, mode)

            def setup() -> None:
                if bench.prepare is not None:
                    bench.prepare()
                if flush is not None:
                    flush.zero_()
                sync()

            def target() -> None:
                bench.run()
                sync()

            benchmark.extra_info.update(provider=prov.name, group=prov.group, mode=mode, device=str(DEVICE))
            benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)
        except Exception as exc:
            status, why = classify_failure(exc)
            if status == "error":
                raise
            pytest.skip(f"{status}: {why}")
        finally:
            free_memory()

    return run
