"""PNG plots of the key comparisons, drawn from the results file's records (every title names the device,
the date and the dtype)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

Rec = dict[str, Any]


def _ok(records: list[Rec], **match: Any) -> list[Rec]:
    return [r for r in records if r["status"] == "ok" and all(r[k] == v for k, v in match.items())]


def _label(r: Rec) -> str:
    s = r["shape"]
    if r["suite"] == "attention":
        return f"{s['model']} W{s['base_window']}\ns{s['stage']} {s['img']}px B{s['batch']}"
    if r["suite"] == "losses":
        return f"B{s['batch']}"
    return s["model"]


def _bars(ax, records: list[Rec], value: Callable[[Rec], float | None], ylabel: str, log: bool = False,
          baseline: float = 0.0, providers: list[str] | None = None) -> bool:
    """Grouped bars: x = case label, one bar per provider, drawn from ``baseline`` (1 for speed-ups, so a
    bar above the line is faster). ``providers`` fixes each provider's slot and colour across the panels of
    a figure (one legend serves them all). False when there is nothing to draw."""
    labels = list(dict.fromkeys(_label(r) for r in records))
    provs = providers or list(dict.fromkeys(r["provider"] for r in records))
    vals = {(_label(r), r["provider"]): value(r) for r in records}
    if not any(v for v in vals.values()):
        return False
    width = 0.8 / max(len(provs), 1)
    for i, p in enumerate(provs):
        xs = [j + (i - (len(provs) - 1) / 2) * width for j in range(len(labels))]
        ys = [vals.get((lab, p)) for lab in labels]
        ax.bar(xs, [y - baseline if y else 0.0 for y in ys], width, bottom=baseline, label=p, color=f"C{i % 10}")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    if baseline:
        ax.axhline(baseline, color="black", lw=0.8)
    ax.grid(axis="y", alpha=0.3)
    return True


def _title(meta: dict[str, Any], what: str, dtype: str) -> str:
    return f"{what} -- {meta['gpu']}, {meta['date']}, {dtype}" + (" (CPU smoke pass)" if meta.get("smoke") else "")


def _save(fig, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)


def _main_dtype(records: list[Rec]) -> str | None:
    dtypes = [r["dtype"] for r in records]
    return "bf16" if "bf16" in dtypes else (dtypes[0] if dtypes else None)


def _speedup(ref: dict[tuple[str, str, str], float]) -> Callable[[Rec], float | None]:
    """Speed-up over the eager reference of the same case and mode."""

    def f(r: Rec) -> float | None:
        base = ref.get((r["scope"], r["shape_name"], r["mode"]))
        return base / r["time_ms"]["median"] if base else None

    return f


def attention(meta: dict[str, Any], records: list[Rec], stem: Path, written: list[Path]) -> None:
    recs = _ok(records, suite="attention")
    dtype = _main_dtype(recs)
    if dtype is None:
        return
    recs = [r for r in recs if r["dtype"] == dtype]
    for scope in ("block", "core", "layer"):
        rs = [r for r in recs if r["scope"] == scope]
        modes = list(dict.fromkeys(r["mode"] for r in rs))
        if not modes:
            continue
        fig, axes = plt.subplots(len(modes), 1, figsize=(12, 3.2 * len(modes)), squeeze=False)
        base = "timm" if scope == "layer" else "eager_ref"
        value = _speedup({(r["scope"], r["shape_name"], r["mode"]): r["time_ms"]["median"]
                          for r in rs if r["provider"] == base})
        drew = False
        provs = list(dict.fromkeys(r["provider"] for r in rs))
        for ax, mode in zip(axes[:, 0], modes):
            drew |= _bars(ax, [r for r in rs if r["mode"] == mode], value, f"{mode}: speed-up vs {base}", log=True,
                          baseline=1.0, providers=provs)
        axes[0, 0].legend(fontsize=7, ncol=4)
        fig.suptitle(_title(meta, f"window attention ({scope})", dtype))
        if drew:
            _save(fig, stem.with_name(f"{stem.name}-attention-{scope}.png"), written)
        else:
            plt.close(fig)
    rs = [r for r in recs if r["scope"] == "block" and r["mode"] == "fwd+bwd"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 6.4))
    drew = _bars(ax1, rs, lambda r: r["roofline_frac"], "fwd+bwd: fraction of copy bandwidth")
    drew_mem = _bars(ax2, rs, lambda r: r["peak_mem_mb"], "fwd+bwd: peak extra memory (MB)", log=True)
    if not drew_mem:
        ax2.set_axis_off()
        ax2.text(0.5, 0.5, "peak memory is not measured on the CPU", ha="center", transform=ax2.transAxes)
    ax1.legend(fontsize=7, ncol=4)
    fig.suptitle(_title(meta, "window attention (block): roofline and memory", dtype))
    if drew:
        _save(fig, stem.with_name(f"{stem.name}-attention-roofline-memory.png"), written)
    else:
        plt.close(fig)


def losses(meta: dict[str, Any], records: list[Rec], stem: Path, written: list[Path]) -> None:
    recs = _ok(records, suite="losses")
    dtype = _main_dtype(recs)
    if dtype is None:
        return
    scopes = [s for s in ("region", "view", "match") if any(r["scope"] == s for r in recs)]
    fig, axes = plt.subplots(2, len(scopes), figsize=(5 * len(scopes), 6.4), squeeze=False)
    for j, scope in enumerate(scopes):
        mode = "fwd+bwd" if scope != "match" else "fwd"
        rs = [r for r in recs if r["scope"] == scope and r["mode"] == mode and r["dtype"] == dtype]
        provs = list(dict.fromkeys(r["provider"] for r in rs))
        _bars(axes[0, j], rs, lambda r: r["time_ms"]["median"], f"{scope} {mode}: ms", log=True, providers=provs)
        if not _bars(axes[1, j], rs, lambda r: r["peak_mem_mb"], f"{scope} {mode}: peak MB", log=True,
                     providers=provs):
            axes[1, j].set_axis_off()
            axes[1, j].text(0.5, 0.5, "memory not measured on the CPU", ha="center", transform=axes[1, j].transAxes)
        axes[0, j].legend(fontsize=6)
    fig.suptitle(_title(meta, "EsViT losses", dtype))
    _save(fig, stem.with_name(f"{stem.name}-losses.png"), written)


def models(meta: dict[str, Any], records: list[Rec], stem: Path, written: list[Path]) -> None:
    recs = [r for r in _ok(records, suite="models") if "images_per_s" in r["extra"]]
    dtype = _main_dtype(recs)
    if dtype is None:
        return
    scopes = list(dict.fromkeys(r["scope"] for r in recs))
    fig, axes = plt.subplots(len(scopes), 1, figsize=(11, 3.2 * len(scopes)), squeeze=False)
    for ax, scope in zip(axes[:, 0], scopes):
        _bars(ax, [r for r in recs if r["scope"] == scope], lambda r: r["extra"]["images_per_s"], f"{scope}: images/s")
        ax.legend(fontsize=7, ncol=3)
    fig.suptitle(_title(meta, "whole models", dtype))
    _save(fig, stem.with_name(f"{stem.name}-models.png"), written)


def draw_all(meta: dict[str, Any], records: list[Rec], json_path: Path) -> list[Path]:
    """Every plot with data, next to the results file; returns the paths written."""
    stem = json_path.with_suffix("")
    written: list[Path] = []
    for draw in (attention, losses, models):
        draw(meta, records, stem, written)
    return written
