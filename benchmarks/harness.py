"""Timing, memory and bandwidth measurement shared by every suite, and the result record.

Protocol (DESIGN.md section 4): on a GPU every repetition is bracketed by CUDA events, an L2 flush (a
256 MB buffer is overwritten) runs before each repetition outside the bracket, the first call (where
``torch.compile`` compiles and Triton autotunes) and a warm-up are never timed, and the figure reported
is the median with the 20th/80th percentiles. On the CPU ``time.perf_counter`` brackets each repetition
and there is no flush. Peak memory is ``torch.cuda.max_memory_allocated`` during one more call, minus
what was allocated just before it; the CPU has no allocator statistics, so memory is ``None`` there and
the record says so.

Modes: ``fwd`` times the forward with grad-enabled inputs (a training forward, saving what the backward
needs); ``bwd`` runs a fresh forward before every repetition, outside the timed region, and times only
``backward`` (a fresh graph per repetition, so nothing is retained or accumulated); ``fwd+bwd`` times both.
Gradients are reset to ``None`` before every repetition, outside the timed region.
"""

from __future__ import annotations

import gc
import importlib
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

MODES = ("fwd", "bwd", "fwd+bwd", "step")
L2_FLUSH_BYTES = 256 * 1024**2


@dataclass
class Settings:
    """How long to warm up and measure; ``quick`` and the CPU get small numbers."""

    device: torch.device
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 10
    max_reps: int = 200
    flush_l2: bool = True
    compile_quota: int | None = None  # max torch.compile'd providers (None: no limit); the CPU smoke pass sets 1

    @classmethod
    def for_device(cls, device: torch.device, quick: bool) -> Settings:
        if device.type != "cuda":
            return cls(device, warmup_ms=0.0, rep_ms=0.0, min_reps=2, max_reps=2, flush_l2=False)
        if quick:
            return cls(device, warmup_ms=10.0, rep_ms=40.0, min_reps=5, max_reps=50)
        return cls(device)

    @property
    def timer(self) -> str:
        return "cuda_events" if self.device.type == "cuda" else "perf_counter"

    def protocol(self) -> dict[str, Any]:
        """The settings as data, for the results file."""
        return {"timer": self.timer, "warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms,
                "min_reps": self.min_reps, "max_reps": self.max_reps, "l2_flush": self.flush_l2,
                "l2_flush_bytes": L2_FLUSH_BYTES if self.flush_l2 else 0, "compile_quota": self.compile_quota,
                "statistic": "median, p20, p80 over repetitions",
                "bwd_mode": "fresh forward per repetition outside the timed region; only backward timed",
                "fwd_mode": "grad-enabled (training) forward",
                "peak_memory": "max_memory_allocated during one call minus memory allocated before it"}


# ----------------------------------------------------------------------------------------------- benches


@dataclass
class Bench:
    """What one repetition does: ``prepare`` (untimed) then ``run`` (timed)."""

    run: Callable[[], Any]
    prepare: Callable[[], None] | None = None


def _zero_grads(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def make_bench(forward: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], mode: str) -> Bench:
    """Turn a forward thunk and the tensors that receive gradients into the bench of ``mode`` (``step``: a
    thunk that does a whole training step itself, timed as is)."""
    if mode in ("fwd", "step"):
        return Bench(run=forward, prepare=lambda: _zero_grads(params))
    grad: list[torch.Tensor | None] = []

    def backward(out: torch.Tensor) -> None:
        if out.dim() == 0:
            out.backward()
            return
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])

    if mode == "fwd+bwd":
        return Bench(run=lambda: backward(forward()), prepare=lambda: _zero_grads(params))
    if mode == "bwd":
        state: dict[str, torch.Tensor] = {}

        def prepare() -> None:
            _zero_grads(params)
            state["out"] = forward()

        def run() -> None:
            backward(state.pop("out"))

        return Bench(run=run, prepare=prepare)
    raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


# ----------------------------------------------------------------------------------------------- timing


class Timer:
    """Times benches on one device with the protocol above."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.cuda = settings.device.type == "cuda"
        self._flush = (torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=settings.device)
                       if self.cuda and settings.flush_l2 else None)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.s.device)

    def _once(self, bench: Bench) -> None:
        if bench.prepare is not None:
            bench.prepare()
        bench.run()

    def _timed(self, bench: Bench, reps: int) -> list[float]:
        """``reps`` repetitions, each flushed and bracketed; milliseconds."""
        if not self.cuda:
            out = []
            for _ in range(reps):
                if bench.prepare is not None:
                    bench.prepare()
                t0 = time.perf_counter()
                bench.run()
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if bench.prepare is not None:
                bench.prepare()
            if self._flush is not None:
                self._flush.zero_()
            starts[i].record()
            bench.run()
            ends[i].record()
        self._sync()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def time(self, bench: Bench) -> dict[str, float]:
        """Median / p20 / p80 / min / mean in ms and the number of repetitions (first call and warm-up
        excluded)."""
        self._once(bench)  # compile, autotune, lazy init
        self._sync()
        reps = self.s.min_reps
        if self.s.max_reps > self.s.min_reps:  # size warm-up and repetitions from an estimate
            est = max(statistics.median(self._timed(bench, 3)), 1e-3)
            for _ in range(min(int(self.s.warmup_ms / est), 100)):
                self._once(bench)
            reps = int(min(max(self.s.rep_ms / est, self.s.min_reps), self.s.max_reps))
        times = sorted(self._timed(bench, reps))
        q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
        return {"median": statistics.median(times), "p20": q[0], "p80": q[3], "min": times[0],
                "mean": statistics.fmean(times), "reps": len(times)}

    def peak_memory_mb(self, bench: Bench) -> float | None:
        """Extra memory one call allocates at its peak (MB), or None on the CPU."""
        if not self.cuda:
            return None
        if bench.prepare is not None:
            bench.prepare()
        self._sync()
        torch.cuda.reset_peak_memory_stats(self.s.device)
        base = torch.cuda.memory_allocated(self.s.device)
        bench.run()
        self._sync()
        return (torch.cuda.max_memory_allocated(self.s.device) - base) / 1024**2


def copy_bandwidth_gbps(device: torch.device, quick: bool) -> dict[str, float]:
    """Device-to-device copy bandwidth (read + write bytes per second), the roofline's ceiling."""
    nbytes = (64 if device.type != "cuda" else (256 if quick else 1024)) * 1024**2
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    settings = Settings.for_device(device, quick)
    settings.flush_l2 = False  # the buffers are far larger than L2
    timing = Timer(settings).time(Bench(run=lambda: dst.copy_(src)))
    gbps = 2 * nbytes / (timing["median"] * 1e-3) / 1e9
    return {"copy_bandwidth_gbps": gbps, "copy_bytes": nbytes, "copy_ms": timing["median"]}


# ----------------------------------------------------------------------------------------------- records


@dataclass
class Record:
    """One measured (or skipped) figure. ``status``: ok | skipped | oom | error."""

    suite: str
    scope: str  # what the timed region covers: block / core / layer (attention), op (losses), model metric
    provider: str
    group: str  # "ours" or "peer"
    shape_name: str
    shape: dict[str, Any]
    dtype: str
    mode: str
    status: str
    reason: str | None = None
    time_ms: dict[str, float] | None = None
    peak_mem_mb: float | None = None
    mem_note: str | None = None
    bytes_min: int | None = None
    bandwidth_gbps: float | None = None
    roofline_frac: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> tuple[str, ...]:
        return (self.suite, self.scope, self.shape_name, self.dtype, self.provider, self.mode)


CPU_MEM_NOTE = "n/a: peak memory is only measured on CUDA devices (no allocator statistics on the CPU)"


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """(status, reason) for an exception raised by a provider: a missing backend or a kernel module absent
    from this checkout is a skip, running out of memory is ``oom``, anything else an ``error``."""
    from esvit_kernels import BackendUnavailableError

    text = f"{type(exc).__name__}: {exc}".strip()
    if isinstance(exc, BackendUnavailableError):
        return "skipped", str(exc)
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith(("esvit_kernels", "esvit")):
        return "skipped", f"not in this checkout: {text}"
    if isinstance(exc, torch.OutOfMemoryError):
        return "oom", text.splitlines()[0]
    return "error", text[:500]


def free_memory() -> None:
    """Drop garbage and cached blocks between providers so each starts from the same state."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def module_available(name: str) -> str | None:
    """None if ``name`` imports, else why not ("<name> not available (...)")."""
    try:
        importlib.import_module(name)
    except Exception as exc:
        return f"{name} not available ({type(exc).__name__}: {exc})"
    return None


def short_traceback(exc: BaseException) -> str:
    """The last frames of a traceback, for printing an ``error`` record."""
    return "".join(traceback.format_exception(exc)[-3:])
