#!/usr/bin/env python3
"""``make gpu-check``: prove and measure the kernels on a GPU in one call, or a dry run without one.

Stages, in order; each runs as a subprocess under its own time limit, logs into ``OUT/<stage>.log``, and a
failing stage never stops the next:

  setup      pip install -e . --no-build-isolation --no-deps (no downloads; the build stage builds _C)
  env        GPU, SM count, driver, torch / triton / timm versions, device-to-device copy bandwidth and a
             bf16 matmul rate (the two ceilings)                                         -> env.json
  build      esvit_kernels._C for this GPU's own architecture with all cores
  tests      tests/gpu in parallel (pytest-xdist when installed), per-test timeout      -> tests.xml
  sanitizer  compute-sanitizer memcheck and racecheck on the small CUDA cases
  bench      python -m benchmarks --headline (window attention fwd / bwd / fwd+bwd at three Swin shapes
             and ViL-2262 stage 1 against the peers, the losses at the Swin-T step shape, one EsViT
             Swin-T step) -> bench/
  summary    summary.md: every stage with what happened, the headline table, what was left out, and the
             command that reruns each stage alone

The whole call keeps to ``--budget-s`` (default 540 s, build included): each stage gets the smaller of its
own cap and what is left after the minimum the later stages need; a stage that runs over is cut (its
process group killed), not stretched; a stage that would not fit is skipped and the summary says so. On a
machine with no GPU (or no torch) the same driver runs in dry mode: the build runs when a CUDA toolkit is
there, the GPU tests are only collected, the rest is skipped with the reason; summary.md is written and the
exit code is 0. On a GPU the exit code is 1 when a stage failed.

Only the standard library is imported here: the driver must run even where the chosen Python lacks torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 540.0


@dataclass
class Stage:
    """One stage: its cap, the least time it is worth starting with, what happened."""

    name: str
    cap_s: float
    min_s: float
    what: str
    status: str = "pending"  # ok | failed | cut | skipped
    note: str = ""
    seconds: float = 0.0
    limit_s: float = 0.0
    rerun: str = ""
    details: dict = field(default_factory=dict)


def _stages() -> dict[str, Stage]:
    s = [
        Stage("setup", 90, 5, "pip install -e . (no deps, no build isolation, no downloads)"),
        Stage("env", 60, 5, "GPU, driver, versions, copy bandwidth, bf16 matmul rate"),
        Stage("build", 180, 20, "esvit_kernels._C for this GPU's architecture"),
        Stage("tests", 190, 40, "tests/gpu (compiled Triton + CUDA vs the reference)"),
        Stage("sanitizer", 90, 20, "compute-sanitizer memcheck + racecheck, small CUDA cases"),
        Stage("bench", 1e9, 60, "benchmark headline (attention, losses, EsViT step)"),
    ]
    return {st.name: st for st in s}


# ------------------------------------------------------------------------------------------------ running


def _run(cmd: list[str], log: Path, limit: float, env: dict | None = None) -> tuple[str, float, int | None]:
    """Run ``cmd`` in its own process group with output to ``log``; kill the group at ``limit`` seconds.
    Returns (status, seconds, returncode) with status ok / failed / cut."""
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(limit, 1.0))
        except subprocess.TimeoutExpired:
            _kill(proc)
            f.write(f"\n[gpu-check] cut after {limit:.0f} s (the stage's time limit)\n")
            return "cut", time.monotonic() - t0, None
    return ("ok" if rc == 0 else "failed"), time.monotonic() - t0, rc


def _kill(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _base_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
    if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
        env["CUDA_HOME"] = "/usr/local/cuda"
    return env




# ------------------------------------------------------------------------------------------------ stages


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.budget = args.budget_s
        self.stages = _stages()
        self.env_info: dict = {}
        self.env = _base_env()
        self.py = sys.executable
        self.gpu = False

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def limit_for(self, st: Stage) -> float:
        later = list(self.stages)[list(self.stages).index(st.name) + 1:]
        reserve = sum(self.stages[n].min_s for n in later if self.stages[n].status == "pending") + 5.0
        return min(st.cap_s, self.left() - reserve)

    def log(self, st: Stage) -> Path:
        return self.out / f"{st.name}.log"

    def run_all(self) -> int:
        only = set(self.args.only or self.stages)
        for name, st in self.stages.items():
            st.rerun = self.rerun_command(name)
            if name not in only or (name == "setup" and self.args.no_install):
                st.status, st.note = "skipped", ("--no-install" if name == "setup" and name in only
                                                 else "not selected (--only)")
                if name == "env":  # the later stages need to know whether there is a GPU
                    self.probe_env(quiet=True)
                continue
            st.limit_s = self.limit_for(st)
            if st.limit_s < st.min_s:
                st.status = "skipped"
                st.note = (f"would not fit: {max(self.left(), 0):.0f} s of the {self.budget:.0f} s budget left, "
                           f"this stage needs at least {st.min_s:.0f} s")
                continue
            getattr(self, f"stage_{name}")(st)
            print(f"[gpu-check] {name}: {st.status} in {st.seconds:.0f} s{' -- ' + st.note if st.note else ''}",
                  flush=True)
        self.write_summary()
        failed = [st.name for st in self.stages.values() if st.status in ("failed", "cut")]
        return 1 if (self.gpu and failed) else 0

    def rerun_command(self, name: str) -> str:
        return f"{Path(self.py).name} tools/gpu_check.py --only {name} --out {self.out}"

    # -- setup
    def stage_setup(self, st: Stage) -> None:
        env = dict(self.env, ESVIT_KERNELS_BUILD_CUDA="0")
        cmd = [self.py, "-m", "pip", "install", "-q", "-e", ".", "--no-build-isolation", "--no-deps", "--no-index"]
        st.status, st.seconds, rc = _run(cmd, self.log(st), st.limit_s, env)
        if st.status != "ok":
            st.note = (f"pip exited {rc}; the stages import the checkout through PYTHONPATH instead: "
                       + _tail(self.log(st), 2).replace("\n", " ")[:200])

    # -- env
    def probe_env(self, quiet: bool = False, st: Stage | None = None) -> None:
        log = self.out / "env.log"
        t0 = time.monotonic()
        try:
            out = subprocess.run([self.py, str(REPO / "tools" / "gpu_env.py")], cwd=REPO, env=self.env,
                                 capture_output=True, text=True, timeout=st.limit_s if st else 120)
            log.write_text(out.stdout + out.stderr)
            self.env_info = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}
            ok = out.returncode == 0 and bool(self.env_info)
        except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            self.env_info, ok = {"why": f"environment probe failed: {type(exc).__name__}"}, False
        self.gpu = bool(self.env_info.get("cuda_available"))
        (self.out / "env.json").write_text(json.dumps(self.env_info, indent=1))
        if st is not None:
            st.seconds = time.monotonic() - t0
            st.status = "ok" if ok else "failed"
            e = self.env_info
            st.note = (f"{e.get('gpu')}, {e.get('sm_count')} SMs, sm_{e.get('capability', '').replace('.', '')}, "
                       f"copy {e.get('copy_bandwidth_gbps')} GB/s, bf16 matmul {e.get('bf16_matmul_tflops')} TFLOP/s"
                       if self.gpu else f"dry mode: {e.get('why', 'no GPU')}")

    def stage_env(self, st: Stage) -> None:
        self.probe_env(st=st)

    # -- build
    def stage_build(self, st: Stage) -> None:
        if self.env_info.get("torch") is None:
            st.status, st.note = "skipped", "torch is not importable by this Python: nothing to build against"
            return
        env = dict(self.env)
        cap = self.env_info.get("capability")
        env["TORCH_CUDA_ARCH_LIST"] = cap if (self.gpu and cap) else env.get("TORCH_CUDA_ARCH_LIST", "9.0")
        env["MAX_JOBS"] = str(os.cpu_count() or 2)
        env["ESVIT_KERNELS_BUILD_CUDA"] = "1" if self.gpu else env.get("ESVIT_KERNELS_BUILD_CUDA", "auto")
        cmd = [self.py, "setup.py", "-q", "build_ext", "--inplace"]
        st.status, st.seconds, rc = _run(cmd, self.log(st), st.limit_s, env)
        st.rerun = (f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} MAX_JOBS={env['MAX_JOBS']} "
                    f"{Path(self.py).name} setup.py build_ext --inplace")
        st.note = f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={env['MAX_JOBS']}"
        if st.status != "ok":
            st.note += f"; exit {rc}: " + _tail(self.log(st), 3).replace("\n", " ")[:300]

    # -- tests
    def stage_tests(self, st: Stage) -> None:
        if self.env_info.get("torch") is None:
            st.status, st.note = "skipped", "torch is not importable by this Python"
            return
        xml = self.out / "tests.xml"
        cmd = [self.py, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={xml}"]
        if not self.gpu:
            cmd.append("--collect-only")
        else:
            if self.env_info.get("xdist"):
                cmd += ["-n", str(min(16, max(2, os.cpu_count() or 2)))]
            if self.env_info.get("pytest_timeout"):
                cmd += ["--timeout", "150"]
        st.rerun = " ".join(Path(c).name if c == self.py else c for c in cmd)
        st.status, st.seconds, rc = _run(cmd, self.log(st), st.limit_s, self.env)
        counts = _junit_counts(xml)
        st.details = counts
        if not self.gpu:
            st.status = "ok" if rc == 0 else "failed"
            st.note = (f"dry mode: no CUDA device, tests/gpu only collected ({_collected(self.log(st))})"
                       if rc == 0 else f"collection failed (exit {rc}): " + _tail(self.log(st), 3).replace("\n", " "))
            return
        if counts:
            st.note = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                       f"{counts['skipped']} skipped")
            if st.status == "failed" and rc == 1 and not counts["failed"] and not counts["errors"]:
                st.status = "ok"
        else:
            st.note = "no JUnit report (cut or crashed before the end): " + _tail(self.log(st), 2).replace("\n", " ")

    # -- sanitizer
    def stage_sanitizer(self, st: Stage) -> None:
        if not self.gpu:
            st.status, st.note = "skipped", "dry mode: compute-sanitizer needs a CUDA device"
            return
        san = shutil.which("compute-sanitizer") or str(Path(self.env.get("CUDA_HOME", "/usr/local/cuda"))
                                                       / "bin" / "compute-sanitizer")
        if not Path(san).exists():
            st.status, st.note = "skipped", "compute-sanitizer not found (PATH, $CUDA_HOME/bin)"
            return
        if self.stages["build"].status != "ok":
            st.status, st.note = "skipped", "esvit_kernels._C was not built (build stage)"
            return
        env = dict(self.env, PYTHON=self.py, COMPUTE_SANITIZER=san)
        notes, statuses, total = [], [], 0.0
        for i, tool in enumerate(("memcheck", "racecheck")):
            limit = (st.limit_s - total) / (2 - i)
            s, secs, rc = _run(["bash", "csrc/tests/sanitize.sh", tool], self.log(st), limit, env)
            total += secs
            statuses.append(s)
            notes.append(f"{tool} {s}{'' if rc in (0, None) else f' (exit {rc})'} in {secs:.0f} s")
        st.status = "failed" if "failed" in statuses else "cut" if "cut" in statuses else "ok"
        st.seconds, st.note = total, "; ".join(notes)
        st.rerun = "PYTHON=python3 csrc/tests/sanitize.sh memcheck racecheck"

    # -- bench
    def stage_bench(self, st: Stage) -> None:
        if self.env_info.get("torch") is None:
            st.status, st.note = "skipped", "torch is not importable by this Python"
            return
        out = self.out / "bench"
        inner = max(st.limit_s - 25.0, 30.0)  # the headline's own budget; the rest is start-up and plots
        cmd = [self.py, "-m", "benchmarks", "--headline", "--out", str(out), "--budget-s", f"{inner:.0f}"]
        if not self.gpu:  # the same code path on tiny shapes: proves the stage and the summary table work
            cmd.append("--cpu")
        st.rerun = " ".join(Path(c).name if c == self.py else c for c in cmd)
        st.status, st.seconds, rc = _run(cmd, self.log(st), st.limit_s, self.env)
        files = sorted(out.glob("*.json"))
        st.details = {"results": str(files[-1]) if files else None}
        st.note = (f"{len(files)} results file(s), plots next to it" if self.gpu else
                   "dry mode: the headline's CPU smoke pass (tiny shapes; checks the code path, not a benchmark)")
        if st.status != "ok":
            st.note += f"; exit {rc}: " + _tail(self.log(st), 3).replace("\n", " ")[:300]

    # -- summary
    def write_summary(self) -> None:
        path = self.out / "summary.md"
        path.write_text(render_summary(self))
        print(f"[gpu-check] summary: {path}", flush=True)


def _junit_counts(xml: Path) -> dict:
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{tc.get('classname', '')}::{tc.get('name')}" for s in suites for tc in s.iter("testcase")
              if tc.find("failure") is not None or tc.find("error") is not None]
    return {"tests": c["tests"], "failed": c["failures"], "errors": c["errors"], "skipped": c["skipped"],
            "passed": c["tests"] - c["failures"] - c["errors"] - c["skipped"], "failed_names": failed}


def _collected(log: Path) -> str:
    for line in reversed(_tail(log, 5).splitlines()):
        if "collected" in line or "tests" in line:
            return line.strip()
    return "see tests.log"


# ------------------------------------------------------------------------------------------------ summary


def headline_rows(results: Path) -> list[dict]:
    """One row per (case, mode, provider of ours): median, ratio to the best peer, roofline, peak memory."""
    try:
        data = json.loads(results.read_text())
    except (OSError, ValueError):
        return []
    recs = data.get("records", [])
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        groups.setdefault((r["suite"], r["scope"], r["shape_name"], r["dtype"], r["mode"]), []).append(r)
    rows = []
    for (suite, scope, shape, dtype, mode), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        # the best peer; where a case has none (the EsViT step), our torch backend is the baseline
        peers = [r for r in ok if r["group"] == "peer"] or [r for r in ok if r["provider"].endswith("torch")]
        best = min(peers, key=lambda r: r["time_ms"]["median"]) if peers else None
        for r in rs:
            row = {"suite": suite, "scope": scope, "shape": shape, "dtype": dtype, "mode": mode,
                   "provider": r["provider"], "group": r["group"], "status": r["status"], "reason": r.get("reason")}
            if r["status"] == "ok":
                t = r["time_ms"]["median"]
                row.update(ms=t, roofline=r.get("roofline_frac"), peak_mb=r.get("peak_mem_mb"),
                           ips=(r.get("extra") or {}).get("images_per_s"),
                           ratio=(best["time_ms"]["median"] / t) if best else None,
                           best_peer=best["provider"] if best else None)
            rows.append(row)
    return rows


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def render_summary(d: Driver) -> str:
    e = d.env_info
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    mode = "GPU run" if d.gpu else "dry run (no GPU)"
    lines = [f"# gpu-check: {e.get('gpu') + ' ' if d.gpu else ''}{mode}, {now}", ""]
    if d.gpu:
        lines += [f"- device: {e.get('gpu')}, {e.get('sm_count')} SMs, compute capability {e.get('capability')}, "
                  f"{e.get('memory_gb')} GiB, L2 {e.get('l2_mb')} MB, shared memory per block (opt-in) "
                  f"{e.get('smem_per_block_optin')} B",
                  f"- measured ceilings: device-to-device copy {e.get('copy_bandwidth_gbps')} GB/s (read + write), "
                  f"bf16 matmul 8192^3 {e.get('bf16_matmul_tflops')} TFLOP/s",
                  f"- nvidia-smi: {e.get('nvidia_smi')}"]
    lines += [f"- python {e.get('python')} ({e.get('executable')}), torch {e.get('torch')} (CUDA "
              f"{e.get('cuda_runtime')}), triton {e.get('triton')}, timm {e.get('timm')}, nvcc: {e.get('nvcc')}",
              f"- budget {d.budget:.0f} s, used {time.monotonic() - d.t0:.0f} s; logs: `<stage>.log` next to this file",
              "", "## Stages", "", "| stage | what | status | time (s) | limit (s) | note |",
              "|---|---|---|---|---|---|"]
    for st in d.stages.values():
        note = st.note.replace("|", "/").replace("\n", " ")
        lim = f"{st.limit_s:.0f}" if st.limit_s else "-"
        lines.append(f"| {st.name} | {st.what} | **{st.status}** | {st.seconds:.0f} | {lim} | {note} |")
    t = d.stages["tests"].details
    if t.get("failed_names"):
        lines += ["", f"Failed tests ({len(t['failed_names'])}):", ""]
        lines += [f"- `{n}`" for n in t["failed_names"][:60]]
    res = d.stages["bench"].details.get("results")
    rows = headline_rows(Path(res)) if res else []
    if rows:
        title = "Headline" if d.gpu else "Headline (CPU smoke pass: tiny shapes, not a benchmark)"
        lines += ["", f"## {title}", "",
                  "Median of CUDA-event timings (L2 flushed), ratio = best peer's time / this time (above 1: faster "
                  "than every peer), roofline = minimum bytes / time as a fraction of the measured copy bandwidth, "
                  "peak = extra memory of one call. Our backends and the best peer of each case; every provider "
                  "is in the results JSON and the plots.", "",
                  "| suite | case | dtype | mode | provider | median ms | vs best peer | roofline | peak MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:  # ours, and the best peer of each (case, mode); every provider is in the JSON and plots
            if r["status"] != "ok" or (r["group"] == "peer" and r["provider"] != r.get("best_peer")):
                continue
            base = r["provider"] == r.get("best_peer")
            vs = ("best peer" if r["group"] == "peer" else "baseline" if base else
                  f"{r['ratio']:.2f}x ({r['best_peer']})" if r.get("ratio") else "-")
            ms = f"{r['ms']:.3f}" + (f" ({r['ips']:.0f} im/s)" if r.get("ips") else "")
            lines.append(f"| {r['suite']}/{r['scope']} | {r['shape']} | {r['dtype']} | {r['mode']} | "
                         f"{r['provider']} | {ms} | {vs} | {_fmt(r.get('roofline'), '.0%')} | "
                         f"{_fmt(r.get('peak_mb'), '.0f')} |")
        skipped = [r for r in rows if r["status"] != "ok"]
        if skipped:
            lines += ["", "Not measured:", ""]
            seen = set()
            for r in skipped:
                key = (r["shape"], r["provider"], r["status"], (r["reason"] or "")[:120])
                if key not in seen:
                    seen.add(key)
                    lines.append(f"- {r['suite']}/{r['scope']} {r['shape']} {r['provider']} ({r['mode']}...): "
                                 f"{r['status']}: {(r['reason'] or '')[:200]}")
    left = [st for st in d.stages.values() if st.status in ("skipped", "cut")]
    lines += ["", "## Left out", ""]
    lines += [f"- {st.name}: {st.status}: {st.note}" for st in left] or ["- nothing"]
    lines += ["", "## Rerun one stage", ""]
    lines += [f"- {st.name}: `{st.rerun}`" for st in d.stages.values()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "gpu-check-out")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall time of the whole call")
    ap.add_argument("--only", nargs="+", choices=list(_stages()), default=None,
                    help="run only these stages (the env probe always runs)")
    ap.add_argument("--no-install", action="store_true", help="skip the pip install -e step")
    args = ap.parse_args(argv)
    args.out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    return Driver(args).run_all()


if __name__ == "__main__":
    raise SystemExit(main())
