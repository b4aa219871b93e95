"""The benchmark time budget holds inside a case: a provider that would overrun what is left is recorded as
skipped with the reason (before it starts, from its estimate; or cut by an alarm while it runs), and the
other providers of the case are still measured."""

from __future__ import annotations

import time

import torch

from benchmarks.harness import Settings
from benchmarks.suite import Case, Forward, Provider, RunContext, run_case


def _ctx(seconds_left: float) -> RunContext:
    settings = Settings.for_device(torch.device("cpu"), quick=True)
    return RunContext(settings=settings, quick=True, copy_gbps=1.0, deadline=time.monotonic() + seconds_left)


def _case(providers: list[Provider]) -> Case:
    return Case(suite="t", scope="s", shape_name="x", shape={}, dtype="fp32", modes=("fwd", "fwd+bwd"),
                make_inputs=lambda: torch.ones(3, requires_grad=True), providers=providers)


def _fast(x: torch.Tensor) -> Forward:
    return Forward(lambda: (x * 2).sum(), [x])


def _slow_build(x: torch.Tensor) -> Forward:
    time.sleep(30)  # interrupted by the deadline alarm long before
    return _fast(x)


def test_provider_that_would_overrun_is_skipped_and_the_rest_measured():
    records = run_case(_case([Provider("compiled", "peer", _fast, compiles=True), Provider("plain", "ours", _fast)]),
                       _ctx(seconds_left=10))
    by = {(r.provider, r.mode): r for r in records}
    assert by[("compiled", "fwd")].status == "skipped" and "time budget" in by[("compiled", "fwd")].reason
    assert by[("plain", "fwd")].status == "ok" and by[("plain", "fwd+bwd")].status == "ok"


def test_provider_running_past_the_deadline_is_cut():
    t0 = time.monotonic()
    records = run_case(_case([Provider("slow", "peer", _slow_build)]), _ctx(seconds_left=3))
    assert time.monotonic() - t0 < 15
    assert {r.status for r in records} == {"skipped"}
    assert all("cut at the time budget" in r.reason for r in records)
