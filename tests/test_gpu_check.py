"""``make gpu-check`` without a GPU: the driver's dry mode runs what a CPU can (the build, the collection of
tests/gpu, the benchmark headline's code path on tiny shapes), says why it skips the rest, writes
summary.md naming every stage, and exits 0 -- so the script that the first GPU session runs cannot rot.
Also its time budget (stages that would not fit are skipped and said so), the JUnit and headline parsing,
and the Makefile's choice of Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402

STAGES = ("setup", "env", "build", "tests", "sanitizer", "bench")


def _cpu_env() -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    return env


def _stage_rows(summary: str) -> dict[str, str]:
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 4 and cells[1] in STAGES:
            rows[cells[1]] = cells[3].strip("*")
    return rows


@pytest.mark.slow
def test_dry_run_names_every_stage_and_exits_zero(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(out), "--no-install"], cwd=REPO,
                          env=_cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    rows = _stage_rows(summary)
    assert set(rows) == set(STAGES), summary
    assert rows["setup"] == "skipped" and rows["sanitizer"] == "skipped"
    assert rows["env"] == "ok" and rows["tests"] == "ok" and rows["bench"] == "ok", summary
    assert rows["build"] in ("ok", "skipped"), summary  # skipped only without a CUDA toolkit
    assert "dry run (no GPU)" in summary and "compute-sanitizer needs a CUDA device" in summary
    assert "tests collected" in summary  # tests/gpu imports and collects on the CPU
    assert "## Headline (CPU smoke pass" in summary and "| attention/block |" in summary
    assert json.loads((out / "env.json").read_text())["cuda_available"] is False
    assert "## Rerun one stage" in summary and "-m pytest tests/gpu" in summary


def test_stages_that_would_not_fit_are_skipped_and_said_so(tmp_path):
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path), "--no-install",
                           "--budget-s", "30"], cwd=REPO, env=_cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "would not fit" in summary and "## Left out" in summary
    assert set(_stage_rows(summary)) == set(STAGES)


def test_make_gpu_check_picks_a_python_and_writes_the_summary(tmp_path):
    proc = subprocess.run(["make", "-s", "gpu-check", f"OUT={tmp_path}", "GPU_CHECK_ARGS=--no-install --only env"],
                          cwd=REPO, env=_cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "gpu-check with" in proc.stdout and (tmp_path / "summary.md").exists()


def test_junit_counts(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
                   '<testcase classname="a" name="ok"/><testcase classname="a" name="bad"><failure/></testcase>'
                   '<testcase classname="b" name="boom"><error/></testcase></testsuite></testsuites>')
    c = gpu_check._junit_counts(xml)
    assert (c["passed"], c["failed"], c["errors"], c["skipped"]) == (2, 1, 1, 1)
    assert c["failed_names"] == ["a::bad", "b::boom"]
    assert gpu_check._junit_counts(tmp_path / "missing.xml") == {}


def test_headline_rows_ratio_against_the_best_peer(tmp_path):
    def rec(provider, group, ms, status="ok", mode="fwd"):
        return {"suite": "attention", "scope": "block", "shape_name": "s1", "dtype": "bf16", "mode": mode,
                "provider": provider, "group": group, "status": status, "reason": None if status == "ok" else "x",
                "time_ms": {"median": ms} if status == "ok" else None, "roofline_frac": 0.5, "peak_mem_mb": 10.0}

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"records": [rec("triton", "ours", 1.0), rec("sdpa", "peer", 3.0),
                                            rec("flex", "peer", 2.0), rec("cuda", "ours", 0, "skipped")]}))
    rows = {r["provider"]: r for r in gpu_check.headline_rows(path)}
    assert rows["triton"]["ratio"] == pytest.approx(2.0) and rows["triton"]["best_peer"] == "flex"
    assert rows["cuda"]["status"] == "skipped" and "ms" not in rows["cuda"]
