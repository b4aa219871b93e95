"""Results file (metadata + records as JSON, merged across runs of one environment) and the tables.

Ratios in the tables are against the best peer of the same case and mode in the same run:
``best peer time / time`` (above 1 = faster than every peer; models: images/s over the best peer's).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .harness import Record, Settings
from .suite import BUDGET_REASON

SCHEMA = "esvit-kernels-benchmarks/1"
FINGERPRINT = ("device", "gpu", "torch", "triton", "cuda", "quick")
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ metadata


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except Exception as exc:  # no git, not a checkout
        return {"commit": None, "dirty": None, "error": str(exc)}


def metadata(device: torch.device, settings: Settings, quick: bool, suites: list[str], bandwidth: dict[str, float],
             argv: list[str]) -> dict[str, Any]:
    """GPU name, versions, protocol and everything needed to compare this file with another later."""
    from esvit_kernels.__main__ import environment

    env = environment()
    now = _dt.datetime.now().astimezone()
    meta: dict[str, Any] = {
        "date": now.date().isoformat(),
        "timestamp": now.isoformat(timespec="seconds"),
        "device": device.type,
        "gpu": env["gpu"] if device.type == "cuda" else "cpu",
        "torch": env["torch"],
        "triton": env["triton"],
        "cuda": env["cuda_runtime"],
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": env["python"],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "quick": quick,
        "smoke": device.type != "cuda",
        "suites": suites,
        "argv": argv,
        "git": _git(),
        "backends": env["backends"],
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "protocol": settings.protocol(),
        **bandwidth,
    }
    try:
        import timm

        meta["timm"] = timm.__version__
    except Exception:
        meta["timm"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu_memory_gb=props.total_memory / 1024**3, sm_count=props.multi_processor_count,
                    compute_capability=f"{props.major}.{props.minor}")
    return meta


def default_path(out_dir: Path, meta: dict[str, Any]) -> Path:
    """``<dir>/<gpu>-<date>.json`` (``cpu-<date>.json`` for the smoke pass)."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(meta["gpu"]).lower()).strip("-") or "unknown"
    return out_dir / f"{slug}-{meta['date']}.json"


# ------------------------------------------------------------------------------------------------ JSON


def load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def compatible(old: dict[str, Any] | None, meta: dict[str, Any]) -> bool:
    """Same device, GPU, versions and quick flag: records of the two runs can share one file."""
    return old is not None and all(old["metadata"].get(k) == meta.get(k) for k in FINGERPRINT)


def resolve_path(path: Path, meta: dict[str, Any]) -> Path:
    """``path``, or a time-suffixed sibling when an existing file there comes from another environment."""
    if not path.exists() or compatible(load(path), meta):
        return path
    stamp = meta["timestamp"][11:19].replace(":", "")
    return path.with_name(f"{path.stem}-{stamp}{path.suffix}")


def done_keys(path: Path, meta: dict[str, Any]) -> set[tuple[str, ...]]:
    """Keys already measured (or skipped for a reason other than the budget) in a compatible file."""
    old = load(path)
    if not compatible(old, meta):
        return set()
    return {_key(r) for r in old["records"] if r["status"] in ("ok", "oom")
            or (r["status"] == "skipped" and r.get("reason") != BUDGET_REASON)}


def _key(r: dict[str, Any]) -> tuple[str, ...]:
    return (r["suite"], r["scope"], r["shape_name"], r["dtype"], r["provider"], r["mode"])


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New records replace old ones with the same key, except that a budget skip never replaces a figure."""
    by_key = {_key(r): r for r in old}
    for r in new:
        prev = by_key.get(_key(r))
        if prev is not None and r.get("reason") == BUDGET_REASON and prev.get("reason") != BUDGET_REASON:
            continue
        by_key[_key(r)] = r
    return list(by_key.values())


def write(path: Path, meta: dict[str, Any], records: Iterable[Record]) -> None:
    """Write (merging into a compatible existing file) atomically."""
    new = [r.to_json() for r in records]
    old = load(path)
    if compatible(old, meta):
        new = merge(old["records"], new)
        meta = {**meta, "suites": sorted(set(old["metadata"].get("suites", [])) | set(meta["suites"]))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    head = json.dumps({"schema": SCHEMA, "metadata": meta}, indent=1, default=str)[:-2]
    rows = ",\n  ".join(json.dumps(r, default=str) for r in new)  # one record per line: compact, diffable
    tmp.write_text(f'{head},\n "records": [\n  {rows}\n ]\n}}\n')
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ tables


def _figure(r: Record) -> float | None:
    """Higher is better: images/s for models, 1/time elsewhere."""
    if r.status != "ok":
        return None
    if "images_per_s" in r.extra:
        return r.extra["images_per_s"]
    return 1.0 / r.time_ms["median"]


def ratios(records: list[Record]) -> dict[tuple[str, str], float]:
    """(provider, mode) -> figure / best peer figure, within one case."""
    out = {}
    for mode in {r.mode for r in records}:
        peers = [f for r in records if r.mode == mode and r.group == "peer" and (f := _figure(r))]
        if not peers:
            continue
        best = max(peers)
        for r in records:
            if r.mode == mode and (f := _figure(r)):
                out[(r.provider, mode)] = f / best
    return out


def _cell(r: Record | None, ratio: float | None) -> str:
    if r is None:
        return f"{'':>24}"
    if r.status != "ok":
        return f"{r.status:>24}"
    main = f"{r.extra['images_per_s']:9.1f} im/s" if "images_per_s" in r.extra else f"{r.time_ms['median']:9.3f} ms"
    rat = f"{ratio:5.2f}x" if ratio else "    - "
    roof = f"{100 * r.roofline_frac:3.0f}%" if r.roofline_frac is not None else "   "
    return f"{main} {rat} {roof}"[:24].rjust(24)


def case_table(records: list[Record]) -> str:
    """One case (same suite, scope, shape, dtype): a row per provider, a column per mode."""
    if not records:
        return ""
    r0 = records[0]
    modes = list(dict.fromkeys(r.mode for r in records))
    provs = list(dict.fromkeys(r.provider for r in records))
    by = {(r.provider, r.mode): r for r in records}
    rat = ratios(records)
    head = f"== {r0.suite}/{r0.scope}  {r0.shape_name}  {r0.dtype}   (ratio: vs best peer, >1 faster; % of copy bw)"
    lines = [head, f"  {'provider':16s}" + "".join(f"{m:>24}" for m in modes) + f"{'peak MB':>10}"]
    notes = []
    for p in provs:
        rows = [by.get((p, m)) for m in modes]
        mems = [r.peak_mem_mb for r in rows if r is not None and r.peak_mem_mb is not None]
        mem = f"{max(mems):10.1f}" if mems else f"{'n/a':>10}"
        lines.append(f"  {p:16s}" + "".join(_cell(r, rat.get((p, m))) for r, m in zip(rows, modes)) + mem)
        reasons = {r.reason for r in rows if r is not None and r.status != "ok" and r.reason}
        for why in reasons:
            which = ",".join(m for r, m in zip(rows, modes) if r is not None and r.reason == why)
            status = next(r.status for r in rows if r is not None and r.reason == why)
            notes.append(f"    {p} [{which}] {status}: {why[:200]}")
        extra = next((r.extra for r in rows if r is not None and "max_batch" in r.extra), None)
        if extra:
            cap = " (cap reached)" if extra.get("capped") else ""
            notes.append(f"    {p}: largest batch {extra['max_batch']}{cap}")
    return "\n".join(lines + notes)


def summary(records: list[Record]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
