"""The L_R ablation (paper Table 8 at demo scale): train view-only and view+region pretraining with several
seeds on one generated dataset, evaluate each -- and a random-init backbone per seed -- on the same held-out
split (k-NN top-1 at k=20, linear probe, correspondence accuracy), and report mean +- std with the paired
per-seed differences.

Layout of the output directory: ``data/`` (the generated train/val ImageFolder), ``runs/<variant>/seed<N>/``
(an ``esvit pretrain`` run and its ``result.json``), ``ablation.json`` and ``ablation.png``. A run whose
``result.json`` exists is finished and skipped on a rerun; an unfinished pretraining resumes from its
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from ..config import load_config, validate
from ..data.synthetic import make_dataset
from ..errors import ConfigError, TrainingError
from .demo import REPO_CONFIGS, evaluate_pair, pretrain_in_child
from .model import EvalModel, load_eval_model, token_grid

__all__ = ["METRICS", "VARIANTS", "AblationRun", "format_table", "paired", "plan_runs", "plot_ablation",
           "run_ablation", "summarise"]

VARIANTS = ("view", "view+region", "random")
METRICS = (("knn_top1", "k-NN top-1, k=20 (%)"), ("linear_top1", "linear probe top-1 (%)"),
           ("correspondence", "correspondence (%)"))


@dataclass
class AblationRun:
    """One (variant, seed) cell: the pretraining overrides it adds to the preset and where it lives."""

    variant: str
    seed: int
    overrides: list[str]
    directory: Path

    @property
    def trained(self) -> bool:
        return self.variant != "random"


def variant_overrides(variant: str, cfg: dict) -> list[str]:
    """Config overrides of ``variant`` on top of the preset ``cfg``: view-only drops the region loss (the
    official view-only loss, view_weight 1.0); view+region keeps the preset's weights (which must use L_R)."""
    if variant == "view":
        return ["loss.region_weight=0"]
    if variant == "view+region":
        if cfg["loss"]["region_weight"] <= 0:
            raise ConfigError("the view+region variant needs a preset with loss.region_weight > 0")
        return []
    if variant == "random":
        return []
    raise ConfigError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def plan_runs(cfg: dict, variants: list[str], seeds: int, out: Path) -> list[AblationRun]:
    """Every (variant, seed) run, seed-major within a variant."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if not variants or len(set(variants)) != len(variants):
        raise ConfigError(f"--variants must name each variant once, got {','.join(variants)}")
    return [AblationRun(v, s, variant_overrides(v, cfg), out / "runs" / v / f"seed{s}")
            for v in variants for s in range(seeds)]


def _run_config(cfg_path: str, overrides: list[str], run: AblationRun) -> dict:
    return validate(load_config(cfg_path, [*overrides, *run.overrides, f"train.seed={run.seed}"]))


def _fingerprint(cfg: dict, run: AblationRun, probe_epochs: int) -> dict:
    """What a finished run's numbers depend on: a rerun with another one is refused, not mixed in."""
    keep = {s: dict(v) for s, v in cfg.items()}
    for volatile in ("output", "progress", "device", "save_every"):
        keep["train"].pop(volatile, None)
    keep["data"].pop("path", None)
    keep["data"].pop("num_workers", None)
    if not run.trained:
        keep = {"model": keep["model"], "data": {"global_crop_size": keep["data"]["global_crop_size"]}}
    return {"variant": run.variant, "seed": run.seed, "config": keep, "probe_epochs": probe_epochs}


def _pretrain_argv(run: AblationRun, args: argparse.Namespace, data: Path) -> list[str]:
    return ["--config", args.config, "--data", str(data), "--output", str(run.directory), "--device", args.device,
            "--backend", args.backend, "--seed", str(run.seed), "--no-progress", *args.overrides, *run.overrides]


def _pretrain(run: AblationRun, args: argparse.Namespace, data: Path) -> float:
    """``esvit pretrain`` of one run in this process (resumes an unfinished one); returns its wall time (s)."""
    from ..commands import pretrain as pretrain_cmd

    p = argparse.ArgumentParser(prog="esvit pretrain")
    pretrain_cmd.add_arguments(p)
    tic = time.perf_counter()
    pretrain_cmd.run(p.parse_args(_pretrain_argv(run, args, data)))
    return time.perf_counter() - tic


def _pretrain_subprocess(run: AblationRun, args: argparse.Namespace, data: Path, threads: int) -> float:
    """The same in a child ``python -m esvit pretrain`` with ``threads`` threads, its output in
    ``pretrain.out`` of the run; returns its wall time (s)."""
    try:
        return pretrain_in_child(_pretrain_argv(run, args, data), run.directory / "pretrain.out", threads)
    except TrainingError as e:
        raise TrainingError(f"pretraining {run.variant} seed {run.seed}: {e}") from None


def _evaluate(run: AblationRun, cfg: dict, args: argparse.Namespace, data: Path, device: torch.device) -> dict:
    if run.trained:
        model = load_eval_model(run.directory / "checkpoint.pth", backend=args.backend, device=device)
    else:
        model = _random_model(cfg, args.backend, device, run.seed)
    res = evaluate_pair({run.variant: model}, data, device, num_workers=args.num_workers,
                        probe_epochs=args.probe_epochs, corr_images=args.corr_images)[run.variant]
    return {"seed": run.seed, "knn_top1": next(e["top1"] for e in res["knn"] if e["k"] == 20),
            "linear_top1": res["linear"]["top1"], "correspondence": 100.0 * res["correspondence"],
            "knn": res["knn"], "linear": res["linear"], "correspondence_images": res["correspondence_images"],
            "num_train": res["num_train"], "num_val": res["num_val"], "source": res["source"]}


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def _mean_std(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std


def summarise(variants: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """variant -> metric -> (mean, sample std over the seeds)."""
    return {v["name"]: {k: _mean_std([r[k] for r in v["runs"]]) for k, _ in METRICS} for v in variants}


def paired(variants: list[dict], a: str, b: str) -> dict[str, list[float]] | None:
    """Per-seed differences ``a - b`` of every metric over the seeds both variants ran (None if one is
    missing)."""
    by = {v["name"]: {r["seed"]: r for r in v["runs"]} for v in variants}
    if a not in by or b not in by:
        return None
    seeds = sorted(set(by[a]) & set(by[b]))
    return {k: [by[a][s][k] - by[b][s][k] for s in seeds] for k, _ in METRICS} | {"seeds": seeds}


def format_table(result: dict) -> str:
    """Mean +- std per variant and metric, then the paired per-seed differences."""
    variants = result["variants"]
    stats = summarise(variants)
    n = max(len(v["runs"]) for v in variants)
    lines = [f"{'':26}" + "".join(f"{label:>26}" for _, label in METRICS)]
    for v in variants:
        name = f"{v['name']} ({len(v['runs'])} seeds)"
        lines.append(f"{name:26}" + "".join(
            f"{stats[v['name']][k][0]:>17.1f} +- {stats[v['name']][k][1]:<5.1f}" for k, _ in METRICS))
    pairs = [("view+region", "view"), ("view+region", "random"), ("view", "random")]
    for a, b in pairs:
        d = paired(variants, a, b)
        if d is None or not d["seeds"]:
            continue
        lines.append(f"{a + ' - ' + b:26}" + "".join(
            f"{' '.join(f'{x:+.1f}' for x in d[k]):>26}" for k, _ in METRICS))
    lines.append(f"(std over seeds; differences paired per seed 0..{n - 1}; {result['num_val']} held-out images, "
                 f"correspondence chance {result['correspondence_chance']:.1f}%)")
    return "\n".join(lines)


def plot_ablation(result: dict, path: Path) -> None:
    """Bars (mean over seeds) with each seed's value as a point, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = result["variants"]
    stats = summarise(variants)
    colours = {"view": "#1f77b4", "view+region": "#ff7f0e", "random": "#7f7f7f"}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(9.6, 3.2), dpi=80)
    for ax, (key, label) in zip(axes, METRICS):
        for i, v in enumerate(variants):
            mean, std = stats[v["name"]][key]
            ax.bar(i, mean, yerr=std, color=colours.get(v["name"], "#2ca02c"), alpha=0.6, capsize=3)
            ys = [r[key] for r in v["runs"]]
            xs = [i + 0.12 * (j - (len(ys) - 1) / 2) for j in range(len(ys))]
            ax.plot(xs, ys, "o", color="black", ms=3)
        ax.set_xticks(range(len(variants)), [v["name"] for v in variants], fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"L_R ablation: {result['arch']} at {result['crop_size']} px, {result['epochs']} epochs, "
                 f"{len(variants[0]['runs'])} seeds (points: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_ablation(args: argparse.Namespace) -> dict:
    """Run (or resume) every run of the ablation, then write ``ablation.json`` and ``ablation.png`` and print
    the table; returns the JSON dict."""
    from tqdm import tqdm

    from ..distributed import resolve_device

    tic = time.perf_counter()
    args.config = args.config or str(REPO_CONFIGS / "demo_cpu.yaml")
    out = Path(args.output)
    device = resolve_device(args.device)
    base = validate(load_config(args.config, args.overrides))
    runs = plan_runs(base, args.variants, args.seeds, out)
    configs = [_run_config(args.config, args.overrides, r) for r in runs]  # every run's config checked first
    d = base["data"]
    out.mkdir(parents=True, exist_ok=True)
    print(f"dataset: {d['embedded_images']} generated {d['embedded_kind']} images of {d['embedded_image_size']} px, "
          f"{d['embedded_classes']} classes, {int(100 * args.val_fraction)}% held out -> {out / 'data'}", flush=True)
    make_dataset(out / "data", d["embedded_images"], d["embedded_classes"], val_fraction=args.val_fraction,
                 image_size=d["embedded_image_size"], seed=0, kind=d["embedded_kind"], progress=not args.no_progress)

    results: dict[tuple[str, int], dict] = {}
    pending: list[tuple[AblationRun, dict, dict]] = []
    for run, cfg in zip(runs, configs):
        done = run.directory / "result.json"
        fp = _fingerprint(cfg, run, args.probe_epochs)
        if done.exists():
            old = json.loads(done.read_text())
            if old.get("fingerprint") != fp:
                raise ConfigError(f"{done} was made with another configuration; use another --output, or delete "
                                  f"{run.directory} to redo that run")
            print(f"{run.variant:12} seed {run.seed}: finished earlier ({done}), skipped", flush=True)
            results[run.variant, run.seed] = old["result"]
        else:
            pending.append((run, cfg, fp))

    def finish(run: AblationRun, cfg: dict, fp: dict, pre_s: float) -> None:
        res = _evaluate(run, cfg, args, out / "data", device) | {"pretrain_time_s": pre_s}
        print(f"{run.variant:12} seed {run.seed}: k-NN {res['knn_top1']:.1f}  linear {res['linear_top1']:.1f}  "
              f"correspondence {res['correspondence']:.1f}", flush=True)
        _write_json(run.directory / "result.json", {"fingerprint": fp, "result": res})
        results[run.variant, run.seed] = res
        bar.update(1)

    bar = tqdm(total=len(pending), desc="ablation", unit="run", disable=True if args.no_progress else None,
               leave=False)
    for run, _, _ in pending:
        run.directory.mkdir(parents=True, exist_ok=True)
        print(f"{run.variant:12} seed {run.seed}: "
              + ("pretraining " + " ".join(run.overrides + [f"train.seed={run.seed}"]) if run.trained
                 else "random init"), flush=True)
    if args.jobs > 1:  # pretrainings side by side in child processes, evaluated here as each one ends
        from concurrent.futures import ThreadPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(_pretrain_subprocess, run, args, out / "data", threads): (run, cfg, fp)
                       for run, cfg, fp in pending if run.trained}
            for run, cfg, fp in pending:
                if not run.trained:
                    finish(run, cfg, fp, 0.0)
            for future in as_completed(futures):
                finish(*futures[future], future.result())
    else:
        for run, cfg, fp in pending:
            finish(run, cfg, fp, _pretrain(run, args, out / "data") if run.trained else 0.0)
    bar.close()
    results_by = {v: [results[v, s] for s in range(args.seeds)] for v in args.variants}

    first = results_by[args.variants[0]][0]
    tokens = _final_tokens(base)
    result = {"variants": [{"name": v, "runs": results_by[v]} for v in args.variants],
              "config": str(args.config), "overrides": list(args.overrides), "arch": base["model"]["arch"],
              "crop_size": d["global_crop_size"], "epochs": base["optim"]["epochs"],
              "loss_weights": {"view": {"view_weight": 1.0, "region_weight": 0.0},
                               "view+region": {k: base["loss"][k] for k in ("view_weight", "region_weight")}},
              "seeds": args.seeds, "num_train": first["num_train"], "num_val": first["num_val"],
              "correspondence_chance": 100.0 / tokens, "units": "percent", "device": str(device),
              "wall_time_s": time.perf_counter() - tic, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "torch": torch.__version__}
    _write_json(out / "ablation.json", result)
    plot_ablation(result, out / "ablation.png")
    print(format_table(result))
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.png'} ({result['wall_time_s']:.0f} s)")
    return result


def _random_model(cfg: dict, backend: str, device: str | torch.device, seed: int) -> EvalModel:
    """The preset's backbone at random initialisation from ``seed``."""
    m = cfg["model"]
    return load_eval_model(random_init=True, arch=m["arch"], window_size=m["window_size"],
                           crop_size=cfg["data"]["global_crop_size"], patch_size=m["patch_size"], backend=backend,
                           device=device, seed=seed)


def _final_tokens(cfg: dict) -> int:
    """Region tokens of the final stage at the global crop size (chance of the correspondence is 1 / this)."""
    model = _random_model(cfg, "torch", "cpu", 0)
    size = cfg["data"]["global_crop_size"]
    with torch.no_grad():
        _, (h, w) = token_grid(model.backbone, torch.zeros(1, 3, size, size))
    return h * w
