"""The end-to-end demo story: generated data -> EsViT pretraining -> k-NN, linear probe and correspondence of
the pretrained backbone against the same architecture at random initialisation -> pictures and a report.

Everything lives under one output directory: ``data/`` (the generated train/val ImageFolder), ``pretrain/``
(the ``esvit pretrain`` run), ``correspondence_pretrained.png``, ``correspondence_random.png``,
``attention_pretrained.png`` and ``report.json``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import load_config, validate
from ..data.synthetic import make_dataset
from .data import eval_loader, split_pair
from .features import extract_features
from .knn import knn_classify
from .linear import train_linear_probe
from .model import EvalModel, load_eval_model
from .transforms import eval_transform

__all__ = ["DemoPlan", "default_config_path", "evaluate_pair", "format_report", "knn_verdict", "plan_demo",
           "pretrain_in_child", "run_demo"]

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
KS = (10, 20, 100, 200)


@dataclass
class DemoPlan:
    """What the demo runs: the pretraining config file and overrides, and the dataset to generate."""

    config_path: Path
    pretrain_args: list[str]  # `esvit pretrain` arguments
    num_images: int
    num_classes: int
    image_size: int
    val_fraction: float
    kind: str
    notes: list[str] = field(default_factory=list)
    view_args: list[str] | None = None  # the quick L_R ablation's view-only `esvit pretrain` (None: skipped)


def default_config_path(cuda: bool) -> tuple[Path, list[str], list[str]]:
    """(preset, extra overrides, notes): ``demo_gpu.yaml`` on a GPU when present (else the CPU preset trained
    4x longer on 4x the images), ``demo_cpu.yaml`` on the CPU."""
    cpu, gpu = REPO_CONFIGS / "demo_cpu.yaml", REPO_CONFIGS / "demo_gpu.yaml"
    if not cuda:
        return cpu, [], []
    if gpu.exists():
        return gpu, [], [f"GPU present: {gpu.name}"]
    cfg = validate(load_config(cpu))
    return cpu, [f"optim.epochs={4 * cfg['optim']['epochs']}",
                 f"data.embedded_images={4 * cfg['data']['embedded_images']}"], \
        ["GPU present but no demo_gpu.yaml: the CPU preset, 4x longer on 4x the images"]


def plan_demo(args: argparse.Namespace, out: Path, cuda: bool) -> DemoPlan:
    """The pretraining command line and dataset of the demo from the CLI arguments."""
    if args.config:
        path, overrides, notes = Path(args.config), [], []
    else:
        path, overrides, notes = default_config_path(cuda)
    overrides = [*overrides, *args.overrides]
    cfg = validate(load_config(path, overrides))
    d = cfg["data"]
    flags = ["--epochs", str(args.epochs)] if args.epochs is not None else []
    if args.no_progress:
        flags.append("--no-progress")

    def pretrain_args(output: str, extra: list[str]) -> list[str]:
        return ["--config", str(path), "--data", str(out / "data"), "--output", str(out / output),
                "--device", args.device, "--backend", args.backend, *overrides, *extra, *flags]

    pre = pretrain_args("pretrain", [])
    view = None
    if cfg["loss"]["region_weight"] > 0 and not args.no_ablation:  # the same run without L_R
        view = pretrain_args("pretrain_view", ["loss.region_weight=0"])
    return DemoPlan(path, pre, d["embedded_images"], d["embedded_classes"], d["embedded_image_size"],
                    args.val_fraction, d["embedded_kind"], notes, view)


def pretrain_in_child(argv: list[str], log: Path, threads: int) -> float:
    """``esvit pretrain ARGV`` in a child ``python -m esvit`` with ``threads`` threads (OMP_NUM_THREADS), its
    output in ``log``; returns its wall time (s), raises :class:`TrainingError` if it fails."""
    import os
    import subprocess
    import sys

    from ..errors import TrainingError

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    log.parent.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "esvit", "pretrain", *argv], stdout=f,
                              stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise TrainingError(f"esvit pretrain failed (exit {code}; {log}): " + " / ".join(tail))
    return time.perf_counter() - tic


def side_by_side(plan: DemoPlan, device: torch.device, jobs: int) -> bool:
    """Whether the two pretrainings of the quick ablation run side by side in child processes: on the CPU with
    ``jobs`` >= 2 and at least two cores (on a 2-core CPU two single-thread runs beat one two-thread run)."""
    import os

    return plan.view_args is not None and device.type == "cpu" and jobs >= 2 and (os.cpu_count() or 1) >= 2


def generate_data(plan: DemoPlan, root: Path, progress: bool) -> dict:
    """The demo's labelled train/val dataset (generated once; the same arguments reuse it)."""
    return make_dataset(root, plan.num_images, plan.num_classes, val_fraction=plan.val_fraction,
                        image_size=plan.image_size, seed=0, kind=plan.kind, progress=progress)


@torch.no_grad()
def evaluate_pair(
    models: dict[str, EvalModel], data_root: Path, device: torch.device, *, batch_size: int = 128,
    num_workers: int = 1, probe_epochs: int = 100, corr_images: int = 256, progress: bool = False,
) -> dict[str, dict]:
    """k-NN (every k of :data:`KS`), linear probe and mean correspondence accuracy over the first
    ``corr_images`` validation images, for each model."""
    from ..viz.correspondence import correspondence_accuracy

    out: dict[str, dict] = {}
    for name, m in models.items():
        train, val = split_pair(data_root, data_root, eval_transform(m.crop_size))

        def both(x: torch.Tensor, b=m.backbone) -> torch.Tensor:
            return torch.cat([b(x)[0], b.forward_return_n_last_blocks(x, 4)], dim=1)

        feats = {}
        for split, ds in (("train", train), ("val", val)):
            loader = eval_loader(ds, batch_size, num_workers, pin_memory=device.type == "cuda")
            feats[split] = extract_features(both, loader, device, len(ds), progress, f"{name}: {split} features")
        c = m.num_features
        knn = knn_classify(feats["train"][0][:, :c], feats["train"][1], feats["val"][0][:, :c], feats["val"][1],
                           KS, 0.07, num_classes=len(train.classes))
        with torch.enable_grad():
            lin = train_linear_probe(feats["train"][0][:, c:], feats["train"][1], feats["val"][0][:, c:],
                                     feats["val"][1], len(train.classes), epochs=probe_epochs, device=device)
        accs: list[float] = []
        loader = eval_loader(torch.utils.data.Subset(val, range(min(corr_images, len(val)))), batch_size, 0)
        for batch in loader:
            accs += correspondence_accuracy(m.backbone, batch["image"].to(device), seed=len(accs))
        out[name] = {"source": m.source, "knn": knn, "linear": {k: lin[k] for k in ("top1", "top5", "lr", "epoch")},
                     "correspondence": sum(accs) / len(accs), "correspondence_images": len(accs),
                     "num_train": len(train), "num_val": len(val), "num_classes": len(train.classes)}
    return out


def knn_verdict(top1: float, baseline: float, n: int) -> str:
    """The difference of two accuracies (percent) on ``n`` validation images, called significant only beyond
    twice its binomial standard error (independent-samples approximation, conservative for paired runs)."""
    p, q = top1 / 100.0, baseline / 100.0
    two_sigma = 200.0 * math.sqrt(max(p * (1 - p) + q * (1 - q), 1e-12) / max(n, 1))
    diff = top1 - baseline
    if diff > two_sigma:
        verdict = "the pretrained backbone beats random init"
    elif diff < -two_sigma:
        verdict = "random init beats the pretrained backbone"
    else:
        verdict = "no significant difference: pretraining does NOT beat random init here"
    return f"{diff:+.1f} points (2 sigma = {two_sigma:.1f} on {n} images) -> {verdict}"


def format_report(report: dict) -> str:
    """The demo's closing summary."""
    res = report["results"]
    p, r = res["pretrained"], res["random_init"]
    cols = [("pretrained", "pretrained")] + ([("view_only", "view only")] if "view_only" in res else []) \
        + [("random_init", "random init")]

    def knn20(x: dict) -> float:
        return next(e["top1"] for e in x["knn"] if e["k"] == 20)

    def row(label: str, value, note: str = "") -> str:
        return f"{label:34}" + "".join(f" {value(res[k]):>12.1f}" for k, _ in cols) + note

    chance = 100.0 / p["num_classes"]
    lines = [
        "",
        "=" * 78,
        f"EsViT demo report  ({report['arch']} at {report['crop_size']} px, {report['epochs']} epochs on "
        f"{p['num_train']} generated images, {p['num_classes']} classes; {report['device']})",
        "-" * 78,
        f"{'':34}" + "".join(f" {name:>12}" for _, name in cols),
        row("k-NN top-1, k=20 (%)", knn20, f"   (chance {chance:.1f})"),
        row("linear probe top-1, best (%)", lambda x: x["linear"]["top1"]),
        row("correspondence accuracy (%)", lambda x: 100 * x["correspondence"],
            f"   (chance {100 / report['tokens']:.1f}; {p['correspondence_images']} val images, flip + jitter)"),
        "-" * 78,
        f"k-NN pretrained vs random init (k=20): {knn_verdict(knn20(p), knn20(r), p['num_val'])}",
        f"backend: window attention {report['backend']}, losses {report['loss_backend']}; "
        f"wall time {report['wall_time_s']:.0f} s (pretraining {report['pretrain_time_s']:.0f} s)",
        *([f"L_R (pretrained = view + region loss {report['loss_weights']} vs view only, one seed): k-NN "
           f"{knn20(p) - knn20(res['view_only']):+.1f}, correspondence "
           f"{100 * (p['correspondence'] - res['view_only']['correspondence']):+.1f} points; over seeds: "
           f"esvit ablate --config {report['config']} --output DIR"] if "view_only" in res else []),
        f"pictures: {', '.join(report['pictures'])}",
        f"report:   {report['report_path']}",
        "=" * 78,
    ]
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> dict:
    """Run the whole story (see the module docstring); returns the report dict (also written as JSON)."""
    import json
    import shutil

    from ..commands import pretrain as pretrain_cmd
    from ..distributed import resolve_device
    from ..viz.attention import attention_maps, draw_attention, last_block_attention
    from ..viz.correspondence import augmented_view, draw_correspondence, match_regions

    tic = time.perf_counter()
    out = Path(args.output)
    device = resolve_device(args.device)
    plan = plan_demo(args, out, device.type == "cuda")
    for note in plan.notes:
        print(note)
    if args.fresh and (out / "pretrain").exists():
        shutil.rmtree(out / "pretrain")
    progress = not args.no_progress
    print(f"[1/4] dataset: {plan.num_images} generated images of {plan.image_size} px, {plan.num_classes} classes, "
          f"{int(100 * plan.val_fraction)}% held out -> {out / 'data'}", flush=True)
    generate_data(plan, out / "data", progress)

    print(f"[2/4] pretraining: esvit pretrain {' '.join(plan.pretrain_args)}", flush=True)
    p = argparse.ArgumentParser(prog="esvit pretrain")
    pretrain_cmd.add_arguments(p)
    pre_args = p.parse_args(plan.pretrain_args)
    cfg = pretrain_cmd.build_config(pre_args)
    ckpt, view_ckpt = out / "pretrain" / "checkpoint.pth", out / "pretrain_view" / "checkpoint.pth"
    if plan.view_args is not None:
        print(f"[2/4] quick L_R ablation, the same without the region loss: esvit pretrain "
              f"{' '.join(plan.view_args)}", flush=True)
        if args.fresh and (out / "pretrain_view").exists():
            shutil.rmtree(out / "pretrain_view")
    t_pre = time.perf_counter()
    if side_by_side(plan, device, args.jobs):
        import os
        from concurrent.futures import ThreadPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // 2)
        runs = {"view + region": (plan.pretrain_args, out / "pretrain.out"),
                "view only": (plan.view_args, out / "pretrain_view.out")}
        print(f"[2/4] both pretrainings side by side, {threads} thread(s) each (--jobs 1: one after the other); "
              f"their output: {out / 'pretrain.out'}, {out / 'pretrain_view.out'}", flush=True)
        with ThreadPoolExecutor(2) as pool:
            futures = {name: pool.submit(pretrain_in_child, [*argv, "--no-progress"], log, threads)
                       for name, (argv, log) in runs.items()}
            for name, future in futures.items():
                secs = future.result()
                print(f"  {name} ({secs:.0f} s):\n" + "\n".join(
                    f"    {line}" for line in runs[name][1].read_text().strip().splitlines()), flush=True)
    else:
        pretrain_cmd.run(pre_args)
        if plan.view_args is not None:
            pretrain_cmd.run(p.parse_args(plan.view_args))
    models = {"pretrained": load_eval_model(ckpt, backend=args.backend, device=device)}
    if plan.view_args is not None:
        models["view_only"] = load_eval_model(view_ckpt, backend=args.backend, device=device)
    pretrain_s = time.perf_counter() - t_pre

    print(f"[3/4] evaluation: k-NN, linear probe and correspondence, pretrained teacher"
          f"{' (view + region, view only)' if plan.view_args else ''} vs random init", flush=True)
    models["random_init"] = load_eval_model(ckpt, random_init=True, backend=args.backend, device=device,
                                            seed=args.seed)
    results = evaluate_pair(models, out / "data", device, num_workers=args.num_workers, progress=progress,
                            probe_epochs=args.probe_epochs)
    for name, res in results.items():
        row = "  ".join(f"k={e['k']}: {e['top1']:.1f}" for e in res["knn"])
        print(f"  {name:12} k-NN top-1 {row}")

    print("[4/4] pictures", flush=True)
    pm = models["pretrained"]
    val = split_pair(out / "data", out / "data", eval_transform(pm.crop_size))[1]
    x = val[args.picture_index % len(val)]["image"][None].to(device)
    view = augmented_view(x.cpu(), seed=args.seed).to(device)
    pictures = []
    tokens = 0
    for name, m in models.items():
        if name == "view_only":
            continue
        corr = match_regions(m.backbone, x, view)[0]
        tokens = corr.grid[0] * corr.grid[1]
        path = out / f"correspondence_{'random' if name == 'random_init' else name}.png"
        draw_correspondence(x.cpu(), view.cpu(), corr, path, title=f"{m.arch} {name.replace('_', ' ')}")
        print(f"  {path}: {100 * corr.accuracy:.1f}% of the {tokens} tokens of this image on the mirrored cell")
        pictures.append(str(path))
    try:
        probs, grid, has_cls = last_block_attention(pm.backbone, x)
        maps = attention_maps(probs, grid, has_cls, "mean")[0].cpu()
        path = out / "attention_pretrained.png"
        draw_attention(x.cpu(), maps, path, title=f"{pm.arch} pretrained: last-block attention per head (mean query)")
        pictures.append(str(path))
    except TypeError:  # a backbone without attention (ResNet)
        pass

    report = {"arch": pm.arch, "crop_size": pm.crop_size, "epochs": cfg["optim"]["epochs"],
              "config": str(plan.config_path), "device": str(device), "backend": pm.backend,
              "loss_backend": _loss_backend(cfg, device), "tokens": tokens,
              "loss_weights": f"{cfg['loss']['view_weight']:g} / {cfg['loss']['region_weight']:g}", "results": results,
              "pictures": pictures, "pretrain_time_s": pretrain_s, "wall_time_s": time.perf_counter() - tic,
              "report_path": str(out / "report.json"), "checkpoint": str(ckpt),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads()}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(format_report(report))
    return report


def _loss_backend(cfg: dict, device: torch.device) -> str:
    from esvit_kernels.backends import resolve_backend

    return resolve_backend(cfg["loss"]["backend"], device, op="region_loss")[0]
