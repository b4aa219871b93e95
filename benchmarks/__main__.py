"""``python -m benchmarks [--suite attention|losses|models|all] [--quick] [--out DIR] ...``

Prints a table per case (ratios against the best peer of the same run), writes
``<out>/<gpu>-<date>.json`` after every case (merged into an existing file of the same environment) and
draws the PNG plots next to it at the end. Without a GPU it says so and runs the CPU smoke pass (tiny
shapes, two repetitions, one ``torch.compile``) into ``build/benchmarks-cpu/``: a check that every provider
path works, not a benchmark.

On a GPU the whole run is held to ``--budget-s`` (default 480 s, so it fits a 10-minute job) split over
the suites; cases are ordered by importance and those past the budget are recorded as skipped. Rerun with
``--resume`` to measure only what the results file lacks; ``--budget-s 0`` removes the limit.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import plots, report
from .harness import Settings, copy_bandwidth_gbps
from .suite import DTYPES, RunContext

SUITES = ("attention", "losses", "models")
WEIGHTS = {"attention": 0.6, "losses": 0.15, "models": 0.25}
DEFAULT_BUDGET_S = 480.0
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="a tiny subset of shapes and fewer repetitions")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results on a GPU, build/benchmarks-cpu on the CPU)")
    ap.add_argument("--cpu", action="store_true", help="run the CPU smoke pass even when a GPU is present")
    ap.add_argument("--dtypes", default=None, help=f"comma-separated subset of {','.join(DTYPES)}")
    ap.add_argument("--providers", default=None, help="comma-separated provider names to keep")
    ap.add_argument("--only", default=None, help="regular expression on case names (shapes, models)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"time limit of the whole run on a GPU (default {DEFAULT_BUDGET_S:.0f}; 0 = none)")
    ap.add_argument("--resume", action="store_true", help="skip cases already in the results file")
    ap.add_argument("--compile-quota", type=int, default=1,
                    help="torch.compile'd providers allowed in the CPU smoke pass (default 1)")
    ap.add_argument("--headline", action="store_true",
                    help="only gpu-check's headline: attention at Swin-T stage 1 / stage 3 (W7) and Swin-B stage 1 "
                    "(W14), B=128 bf16; the losses at B=32, K=65536; one EsViT Swin-T step at B=32")
    ap.add_argument("--no-plots", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    quick = args.quick or not on_gpu
    if not on_gpu:
        why = "--cpu given" if torch.cuda.is_available() else "no GPU"
        print(f"{why}: running the CPU smoke pass (tiny shapes, 2 repetitions; checks the provider paths, "
              "its figures are not benchmark results)", flush=True)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    settings = Settings.for_device(device, quick)
    if not on_gpu:
        settings.compile_quota = args.compile_quota
        torch.set_num_threads(1)  # a path check: one thread is steadier on a shared machine
    bandwidth = copy_bandwidth_gbps(device, quick)
    meta = report.metadata(device, settings, quick, suites, bandwidth, ["-m", "benchmarks", *sys.argv[1:]]
                           if argv is None else ["-m", "benchmarks", *argv])
    out_dir = args.out or (REPO / ("benchmarks/results" if on_gpu else "build/benchmarks-cpu"))
    path = report.resolve_path(report.default_path(out_dir, meta), meta)
    budget = args.budget_s if args.budget_s is not None else (DEFAULT_BUDGET_S if on_gpu and not quick else 0.0)
    print(f"device: {meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  CUDA {meta['cuda']}  "
          f"copy bandwidth {bandwidth['copy_bandwidth_gbps']:.0f} GB/s", flush=True)
    print(f"results: {path}" + (f"  (time budget {budget:.0f} s)" if budget else ""), flush=True)

    ctx = RunContext(
        settings=settings, quick=quick, copy_gbps=bandwidth["copy_bandwidth_gbps"],
        providers=set(args.providers.split(",")) if args.providers else None, only=args.only,
        dtypes=tuple(args.dtypes.split(",")) if args.dtypes else None,
        done=report.done_keys(path, meta) if args.resume else set(),
        log=lambda s: print(s, flush=True),
    )
    if ctx.dtypes and not set(ctx.dtypes) <= set(DTYPES):
        print(f"unknown dtype in --dtypes {args.dtypes}; choose from {','.join(DTYPES)}", file=sys.stderr)
        return 2
    records = run_headline(ctx, budget, path, meta) if args.headline else run_suites(ctx, suites, budget, path, meta)
    data = report.load(path)
    if not args.no_plots and data:
        for p in plots.draw_all(data["metadata"], data["records"], path):
            print(f"plot: {p}")
    print(f"done: {report.summary(records)}; results in {path}")
    return 0


def run_suites(ctx: RunContext, suites: list[str], budget: float, path: Path, meta: dict) -> list:
    """Run the suites in order, each within its share of the remaining budget, writing after every case."""
    from . import attention, losses, models

    modules = {"attention": attention, "losses": losses, "models": models}
    end = time.monotonic() + budget if budget else None
    records: list = []
    for i, name in enumerate(suites):
        if end is not None:
            rest = sum(WEIGHTS[s] for s in suites[i:])
            ctx.deadline = time.monotonic() + max(end - time.monotonic(), 0.0) * WEIGHTS[name] / rest
        t0 = time.monotonic()
        for case_records in modules[name].run(ctx):
            records.extend(case_records)
            print(report.case_table(case_records), f"\n  ({time.monotonic() - t0:.1f} s)", flush=True)
            report.write(path, meta, case_records)
            t0 = time.monotonic()
    return records


def headline_plan(ctx: RunContext) -> list[tuple[float, str, Callable[[], Iterator[list]]]]:
    """gpu-check's headline in priority order: (share of the budget, label, record generator)."""
    from . import attention, losses, models
    from .suite import run_cases

    dtype = "bf16" if ctx.device.type == "cuda" else "fp32"
    shapes = attention.headline_shapes(ctx.device)
    att = lambda shape: lambda: run_cases(iter([attention.block_case(ctx, shape, dtype)]), ctx)  # noqa: E731
    loss_shape = losses.headline_shape(ctx.device)
    loss_cases = [losses.loss_case(ctx, loss_shape, dtype, scope) for scope in ("region", "view")]
    vil = attention.vil_headline_shape(ctx.device)
    plan = [
        (0.30, f"attention {shapes[0].name}", att(shapes[0])),
        (0.20, "losses", lambda: run_cases(iter(loss_cases), ctx)),
        (0.20, "EsViT Swin-T step", lambda: models.headline_step(ctx)),
        (0.15, f"attention {vil.name}", lambda: run_cases(iter([attention.vil_case(ctx, vil, dtype)]), ctx)),
    ]
    return plan + [(0.15, f"attention {s.name}", att(s)) for s in shapes[1:]]


def run_headline(ctx: RunContext, budget: float, path: Path, meta: dict) -> list:
    """The headline groups in order, each within its share of the time left (unused time rolls over)."""
    plan = headline_plan(ctx)
    end = time.monotonic() + budget if budget else None
    records: list = []
    for i, (share, label, gen) in enumerate(plan):
        if end is not None:
            rest = sum(sh for sh, _, _ in plan[i:])
            ctx.deadline = time.monotonic() + max(end - time.monotonic(), 0.0) * share / rest
            print(f"[{label}: {ctx.time_left():.0f} s]", flush=True)
        t0 = time.monotonic()
        for case_records in gen():
            records.extend(case_records)
            print(report.case_table(case_records), f"\n  ({time.monotonic() - t0:.1f} s)", flush=True)
            report.write(path, meta, case_records)
            t0 = time.monotonic()
    return records


if __name__ == "__main__":
    raise SystemExit(main())
