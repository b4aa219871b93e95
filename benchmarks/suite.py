"""Providers, cases and the loop that measures every provider of a case in every mode.

A *provider* is one implementation under test (ours or a peer): ``build(inputs) -> Forward``, the forward
thunk and the tensors that receive gradients, built once per case and shared by the modes. A *case* is
one (suite, scope, shape, dtype) with one input factory shared by all its providers. Providers that
cannot run here are recorded as skipped with the reason, never substituted.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .harness import (
    CPU_MEM_NOTE,
    Record,
    Settings,
    Timer,
    classify_failure,
    free_memory,
    make_bench,
    short_traceback,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BUDGET_REASON = "time budget exhausted (--budget-s); rerun with --resume to measure it"
COMPILE_EST_S = 20.0  # measured on an H200 (16 cores): torch.compile + flex at Swin-B W14 took 35 s together


class BudgetExceeded(Exception):
    """Raised inside a provider (by an alarm) when it runs past the run's deadline."""


@contextlib.contextmanager
def deadline_alarm(deadline: float | None):
    """Raise :class:`BudgetExceeded` in this thread once ``time.monotonic()`` passes ``deadline`` (SIGALRM;
    a no-op off the main thread, on platforms without it, or without a deadline)."""
    usable = (deadline is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise BudgetExceeded("cut at the time budget (--budget-s) while running; rerun with --resume")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Forward:
    """A forward thunk and the tensors whose gradients each repetition resets."""

    fn: Callable[[], torch.Tensor]
    params: Sequence[torch.Tensor] = ()


def _no_skip(inputs: Any, mode: str) -> str | None:
    return None


@dataclass(frozen=True)
class Provider:
    """One implementation under test. ``check(inputs, mode)`` returns a skip reason or None."""

    name: str
    group: str  # "ours" | "peer"
    build: Callable[[Any], Forward]
    check: Callable[[Any, str], str | None] = _no_skip
    compiles: bool = False
    note: str = ""

    @property
    def est_s(self) -> float:
        """Rough seconds the provider needs on a GPU for all modes of one case, compilation included: a
        provider is skipped when less time is left than this (a torch.compile'd one is compiled once per
        case and its forward and backward graphs take tens of seconds)."""
        return COMPILE_EST_S if self.compiles else 2.0


@dataclass
class Case:
    """One (suite, scope, shape, dtype) measured for every provider in ``modes``.

    ``bytes_min(mode)`` is the minimum HBM traffic of the op (None where no roofline applies).
    """

    suite: str
    scope: str
    shape_name: str
    shape: dict[str, Any]
    dtype: str
    modes: tuple[str, ...]
    make_inputs: Callable[[], Any]
    providers: Sequence[Provider]
    bytes_min: Callable[[str], int | None] = lambda mode: None

    def record(self, provider: Provider, mode: str, status: str, reason: str | None = None, **kw: Any) -> Record:
        extra = kw.pop("extra", {})
        if provider.note:
            extra = {"note": provider.note, **extra}
        return Record(suite=self.suite, scope=self.scope, provider=provider.name, group=provider.group,
                      shape_name=self.shape_name, shape=self.shape, dtype=self.dtype, mode=mode,
                      status=status, reason=reason, extra=extra, **kw)

    def skipped(self, reason: str) -> list[Record]:
        return [self.record(p, m, "skipped", reason) for p in self.providers for m in self.modes]

    def keys(self) -> list[tuple[str, ...]]:
        return [(self.suite, self.scope, self.shape_name, self.dtype, p.name, m)
                for p in self.providers for m in self.modes]


@dataclass
class RunContext:
    """Everything a suite needs to run: device, protocol, bandwidth ceiling, budget, output hooks."""

    settings: Settings
    quick: bool
    copy_gbps: float
    deadline: float | None = None  # time.monotonic() after which cases are skipped
    providers: set[str] | None = None  # --providers filter
    only: str | None = None  # --only regex on shape names
    dtypes: tuple[str, ...] | None = None
    done: set[tuple[str, ...]] = field(default_factory=set)  # --resume: keys already in the results file
    compiles_used: int = 0
    log: Callable[[str], None] = print
    timer: Timer | None = None

    @property
    def device(self) -> torch.device:
        return self.settings.device

    def get_timer(self) -> Timer:
        if self.timer is None:
            self.timer = Timer(self.settings)
        return self.timer

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def select(self, providers: Sequence[Provider]) -> list[Provider]:
        """The providers the --providers filter keeps."""
        return [p for p in providers if self.providers is None or p.name in self.providers]

    def is_done(self, case: Case) -> bool:
        """--resume: every record of the case is already in the results file."""
        keys = case.keys()
        return bool(keys) and all(k in self.done for k in keys)

    def wants(self, name: str, dtype: str) -> bool:
        """The --only and --dtypes filters."""
        return (not self.dtypes or dtype in self.dtypes) and (not self.only or bool(re.search(self.only, name)))

    def compile_allowed(self) -> bool:
        quota = self.settings.compile_quota
        return quota is None or self.compiles_used < quota


INTERPRETER_MODES = ("fwd+bwd", "step")


def backend_check(backend: str, *ops: str, interpreter_modes: tuple[str, ...] = INTERPRETER_MODES
                  ) -> Callable[[Any, str], str | None]:
    """A provider check: the reason ``backend`` cannot run one of ``ops`` on the inputs' device, or None.

    Triton on the CPU runs in the (slow) interpreter: there only ``interpreter_modes`` are run -- fwd+bwd
    runs both kernels, and the fwd / bwd bench paths are covered by every other provider.
    """
    from esvit_kernels.backends import BackendUnavailableError, resolve_backend

    def check(inputs: Any, mode: str) -> str | None:
        for op in ops:
            try:
                resolve_backend(backend, inputs.device, op)
            except BackendUnavailableError as exc:
                return str(exc)
        if backend == "triton" and inputs.device.type == "cpu" and mode not in interpreter_modes:
            return f"the Triton interpreter (CPU) is slow: on the CPU triton runs only in {'/'.join(interpreter_modes)}"
        return None

    return check


def run_cases(cases: Iterator[Case], ctx: RunContext) -> Iterator[list[Record]]:
    """Run cases one by one (skipping those --resume finds done); the caller writes results as they come."""
    for case in cases:
        if case.providers and not ctx.is_done(case):
            ctx.log(f"{case.suite}/{case.scope}  {case.shape_name}  {case.dtype}")
            yield run_case(case, ctx)


def _compile_reset() -> None:
    """Fresh dynamo state so a compiled provider never hits the recompile limit (and silently runs eager)."""
    torch._dynamo.reset()


def run_case(case: Case, ctx: RunContext) -> list[Record]:
    """Measure every provider of ``case`` in every mode; failures become records, never exceptions."""
    providers = case.providers
    if ctx.out_of_time():
        return case.skipped(BUDGET_REASON)
    try:
        inputs = case.make_inputs()
    except Exception as exc:  # e.g. OOM on the inputs alone
        status, reason = classify_failure(exc)
        free_memory()
        return [case.record(p, m, status, f"inputs: {reason}") for p in providers for m in case.modes]
    timer = ctx.get_timer()
    records: list[Record] = []
    for prov in providers:
        records.extend(_run_provider(case, prov, inputs, timer, ctx))
    del inputs
    free_memory()
    return records


def _run_provider(case: Case, prov: Provider, inputs: Any, timer: Timer, ctx: RunContext) -> list[Record]:
    reasons = {m: prov.check(inputs, m) for m in case.modes}
    if all(reasons.values()):
        return [case.record(prov, m, "skipped", reasons[m]) for m in case.modes]
    if ctx.deadline is not None and ctx.time_left() < prov.est_s:
        why = (f"time budget: {max(ctx.time_left(), 0):.0f} s left of this run's share, this provider needs about "
               f"{prov.est_s:.0f} s{' (torch.compile)' if prov.compiles else ''}; rerun with --resume")
        return [case.record(prov, m, "skipped", reasons[m] or why) for m in case.modes]
    if prov.compiles:
        if not ctx.compile_allowed():
            why = (f"the CPU smoke pass compiles at most {ctx.settings.compile_quota} graph(s) to stay fast; "
                   "this torch.compile provider runs in GPU runs")
            return [case.record(prov, m, "skipped", reasons[m] or why) for m in case.modes]
        ctx.compiles_used += 1
        _compile_reset()
    out: list[Record] = []
    fwd = None
    try:
        with deadline_alarm(ctx.deadline):
            try:
                fwd = prov.build(inputs)
            except Exception as exc:
                status, reason = _failure(exc, ctx)
            else:
                status = None
            if status is not None:  # outside the except block, so the traceback's tensors can be freed
                free_memory()
                return [case.record(prov, m, "skipped", reasons[m]) if reasons[m] else
                        case.record(prov, m, status, reason) for m in case.modes]
            for mode in case.modes:
                if reasons[mode] or ctx.out_of_time():
                    out.append(case.record(prov, mode, "skipped", reasons[mode] or BUDGET_REASON))
                    continue
                out.append(_measure(case, prov, fwd, mode, timer, ctx))
    except BudgetExceeded as exc:  # the alarm fired between two measurements
        done = {r.mode for r in out}
        out += [case.record(prov, m, "skipped", reasons[m] or str(exc)) for m in case.modes if m not in done]
    del fwd
    if prov.compiles:
        _compile_reset()
    free_memory()
    return out


def _failure(exc: BaseException, ctx: RunContext) -> tuple[str, str]:
    if isinstance(exc, BudgetExceeded):
        return "skipped", str(exc)
    status, reason = classify_failure(exc)
    if status == "error":
        ctx.log(short_traceback(exc))
    return status, reason


def _measure(case: Case, prov: Provider, fwd: Forward, mode: str, timer: Timer, ctx: RunContext) -> Record:
    bench = make_bench(fwd.fn, fwd.params, mode)
    try:
        timing = timer.time(bench)
        mem = timer.peak_memory_mb(bench)
    except Exception as exc:
        status, reason = _failure(exc, ctx)
    else:
        status = None
    if status is not None:  # outside the except block, so the traceback's tensors can be freed
        del bench
        free_memory()
        return case.record(prov, mode, status, reason)
    nbytes = case.bytes_min(mode)
    bw = frac = None
    if nbytes:
        bw = nbytes / (timing["median"] * 1e-3) / 1e9
        frac = bw / ctx.copy_gbps
    return case.record(prov, mode, "ok", time_ms=timing, peak_mem_mb=mem,
                       mem_note=None if mem is not None else CPU_MEM_NOTE,
                       bytes_min=nbytes, bandwidth_gbps=bw, roofline_frac=frac)
