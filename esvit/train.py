"""EsViT pretraining: :class:`Trainer` (models, loss, optimiser, schedules, one step) and :func:`pretrain`
(data, the epoch loop, logging, checkpoints, resuming).

One step, as the official ``main_esvit.py`` runs it: set this iteration's LR (both param groups) and
weight decay (the decayed group); teacher forward on the 2 global crops, student forward on all crops,
loss ``w_v L_V + w_r L_R`` (centers updated after it), under autocast when asked; stop on a non-finite
loss; backward (through a GradScaler for fp16); per-parameter gradient clipping; drop the gradients of
both heads' last layers during the first ``freeze_last_layer`` epochs; AdamW step; teacher EMA with this
iteration's momentum.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt
from .config import from_dict
from .distributed import DistEnv, all_reduce_mean, barrier, cleanup, convert_sync_batchnorm, init_distributed
from .errors import CheckpointError, ConfigError, DataError, TrainingError
from .losses import EsViTLoss
from .models import VIT_ARCHS, DINOHead, MultiCropWrapper, create_backbone
from .schedules import cosine_scheduler, teacher_temp_schedule

__all__ = ["NonFiniteLossError", "StepStats", "Trainer", "build_backbone", "clip_gradients", "param_groups",
           "pretrain"]

_AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(TrainingError):
    """The loss of a step is NaN or infinite (nothing was updated)."""


@dataclass
class StepStats:
    loss: float
    loss_view: float
    loss_region: float
    lr: float
    wd: float
    momentum: float
    teacher_temp: float


def build_backbone(cfg: dict, *, teacher: bool = False) -> nn.Module:
    """The backbone described by ``cfg`` (teacher: drop path 0, no checkpointing)."""
    m = cfg["model"]
    kwargs = {"patch_size": m["patch_size"]} if m["arch"] in VIT_ARCHS else {}
    return create_backbone(
        m["arch"], window_size=m["window_size"], img_size=cfg["data"]["global_crop_size"], backend=m["backend"],
        drop_path_rate=0.0 if teacher else m["drop_path_rate"], use_checkpoint=m["use_checkpoint"] and not teacher,
        **kwargs,
    )


def build_heads(cfg: dict, in_dim: int) -> tuple[nn.Module, nn.Module | None]:
    """View head and (when the region loss is on) a separate region head of the same shape."""
    h = cfg["head"]

    def make() -> DINOHead:
        return DINOHead(in_dim, h["out_dim"], hidden_dim=h["hidden_dim"], bottleneck_dim=h["bottleneck_dim"],
                        nlayers=h["nlayers"], use_bn=h["use_bn"], norm_last_layer=h["norm_last_layer"])

    return make(), (make() if cfg["loss"]["region_weight"] > 0 else None)


def param_groups(model: nn.Module) -> list[dict]:
    """AdamW groups as DINO: tensors with >= 2 dims decayed (group 0), biases and 1-d tensors not (group 1)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO / EsViT clipping: every parameter's gradient is scaled to norm <= ``clip`` on its own."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm(2)
            p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))


def cancel_last_layer_grads(model: nn.Module) -> None:
    """Drop the gradients of the heads' last layers (AdamW then leaves them untouched this step)."""
    for name, p in model.named_parameters():
        if ".last_layer." in name:
            p.grad = None


class Trainer:
    """Student / teacher / heads / loss / AdamW / schedules of one EsViT run, stepped one batch at a time.

    ``Trainer(cfg, steps_per_epoch=N, device="cuda")`` builds everything from a config dict -- full
    (:func:`esvit.config.load_config`) or partial (e.g. ``{"model": {"arch": "swin_tiny"}, "optim":
    {"batch_size": 64}}``, the rest defaults); ``train_step(crops)`` runs one step on a list of crop batches
    ``[global_1, global_2, local_1, ...]`` (each (B, 3, H, W)) and returns :class:`StepStats`. Under
    ``torchrun`` the student is wrapped in DistributedDataParallel and the centers are all-reduced.
    """

    def __init__(self, cfg: dict, *, steps_per_epoch: int, env: DistEnv | None = None,
                 device: str | torch.device | None = None) -> None:
        self.cfg = cfg = from_dict(copy.deepcopy(cfg))
        if env is None:
            env = DistEnv(device=torch.device(device or "cpu"))
        self.env, self.device = env, env.device
        self.steps_per_epoch = int(steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        o, lo, t = cfg["optim"], cfg["loss"], cfg["train"]

        backbone = build_backbone(cfg)
        head, region_head = build_heads(cfg, backbone.num_features)
        student = MultiCropWrapper(backbone, head, region_head).to(self.device)
        teacher_backbone = build_backbone(cfg, teacher=True)
        teacher = MultiCropWrapper(teacher_backbone, copy.deepcopy(head), copy.deepcopy(region_head)).to(self.device)
        if env.distributed:  # BatchNorm over the global batch, on gloo (CPU) as on NCCL
            student = convert_sync_batchnorm(student, self.device)
            teacher = convert_sync_batchnorm(teacher, self.device)
        self.student_module = student
        if env.distributed:
            ids = [self.device] if self.device.type == "cuda" else None
            self.student: nn.Module = nn.parallel.DistributedDataParallel(student, device_ids=ids)
        else:
            self.student = student
        teacher.load_state_dict(student.state_dict())  # after DDP's broadcast: every rank has rank 0's weights
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        if cfg["model"]["compile"]:
            student.backbone.compile()
            teacher.backbone.compile()
        self._student_params = list(student.parameters())
        self._teacher_params = list(teacher.parameters())

        self.loss = EsViTLoss(head.last_layer.weight_v.shape[0], view_weight=lo["view_weight"],
                              region_weight=lo["region_weight"], student_temp=lo["student_temp"],
                              center_momentum=lo["center_momentum"], backend=lo["backend"]).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(student))
        self.amp_dtype = _AMP[t["precision"]]
        self.scaler = torch.amp.GradScaler(self.device.type) if t["precision"] == "fp16" else None

        self.global_batch = o["batch_size"] * env.world_size
        epochs, spe = o["epochs"], self.steps_per_epoch
        self.lr_schedule = cosine_scheduler(o["lr"] * self.global_batch / 256.0, o["min_lr"], epochs, spe,
                                            warmup_epochs=o["warmup_epochs"])
        self.wd_schedule = cosine_scheduler(o["weight_decay"], o["weight_decay_end"], epochs, spe)
        self.momentum_schedule = cosine_scheduler(o["momentum_teacher"], 1.0, epochs, spe)
        self.teacher_temps = teacher_temp_schedule(lo["warmup_teacher_temp"], lo["teacher_temp"],
                                                   lo["warmup_teacher_temp_epochs"], epochs)
        self.iteration = 0

    @property
    def epoch(self) -> int:
        return self.iteration // self.steps_per_epoch

    def _sched(self, schedule: np.ndarray, index: int) -> float:
        return float(schedule[min(index, len(schedule) - 1)])

    def train_step(self, crops: list[torch.Tensor]) -> StepStats:
        """One optimisation step on ``crops`` = [global_1, global_2, local_1, ...] (each (B, 3, H, W))."""
        if len(crops) < 2 or crops[0].shape != crops[1].shape:
            raise ValueError("crops must start with the two global crops (same shape)")
        it, epoch = self.iteration, self.epoch
        lr, wd = self._sched(self.lr_schedule, it), self._sched(self.wd_schedule, it)
        momentum, temp = self._sched(self.momentum_schedule, it), self._sched(self.teacher_temps, epoch)
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        crops = [c.to(self.device, non_blocking=True) for c in crops]

        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            with torch.no_grad():
                t_out = self.teacher(crops[:2])
            s_out = self.student(crops)
            out = self.loss(s_out, t_out, temp)
        region = out.region if out.region is not None else torch.zeros((), device=self.device)
        values = all_reduce_mean(torch.stack([out.total.detach().float(), out.view.detach().float(),
                                              region.detach().float()]))
        loss_v, view_v, region_v = values.tolist()
        if not math.isfinite(loss_v):
            raise NonFiniteLossError(f"the loss is {loss_v} at iteration {it} (epoch {epoch}; view {view_v}, "
                                     f"region {region_v})")

        self.optimizer.zero_grad(set_to_none=True)
        clip = self.cfg["optim"]["clip_grad"]
        if self.scaler is not None:
            self.scaler.scale(out.total).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)
                clip_gradients(self.student_module, clip)
        else:
            out.total.backward()
            if clip:
                clip_gradients(self.student_module, clip)
        if epoch < self.cfg["optim"]["freeze_last_layer"]:
            cancel_last_layer_grads(self.student_module)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

        with torch.no_grad():  # teacher EMA over every parameter (frozen ones included, as official)
            torch._foreach_mul_(self._teacher_params, momentum)
            torch._foreach_add_(self._teacher_params, self._student_params, alpha=1.0 - momentum)
        self.iteration += 1
        return StepStats(loss_v, view_v, region_v, lr, wd, momentum, temp)

    def state_dict(self) -> dict:
        return {
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loss": self.loss.state_dict(),
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            self.student_module.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.loss.load_state_dict(state["loss"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"the checkpoint does not fit this model / optimiser: {exc}") from exc
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])


# ------------------------------------------------------------------------------------------- the run

# settings that may differ between a run and its resumption
_RESUMABLE_CHANGES = {"model.backend", "model.compile", "model.use_checkpoint", "loss.backend", "data.path",
                      "data.num_workers", "data.cache_dir", "optim.batch_size", "optim.epochs"}


def _check_resumable(old: dict, new: dict, old_world: int, new_world: int) -> list[str]:
    """Errors on changes that make the checkpoint meaningless; returns warnings for the tolerated ones."""
    diffs = []
    for section in ("model", "head", "loss", "data", "optim"):
        for key, value in new[section].items():
            if old.get(section, {}).get(key) != value and f"{section}.{key}" not in _RESUMABLE_CHANGES:
                diffs.append(f"{section}.{key}: {old.get(section, {}).get(key)!r} -> {value!r}")
    if diffs:
        raise ConfigError("the output directory holds a checkpoint of another configuration ("
                          + "; ".join(diffs) + "); use a new --output or remove its checkpoint.pth")
    warnings = []
    old_gb, new_gb = old["optim"]["batch_size"] * old_world, new["optim"]["batch_size"] * new_world
    if old_gb != new_gb:
        raise ConfigError(f"the checkpoint was trained with a global batch of {old_gb}, this run has {new_gb} "
                          f"(batch_size x processes); keep the global batch to resume")
    if old["optim"]["epochs"] != new["optim"]["epochs"]:
        warnings.append(f"optim.epochs changed {old['optim']['epochs']} -> {new['optim']['epochs']}: the "
                        "schedules are recomputed for the new length")
    return warnings


def resolve_data_root(cfg: dict, env: DistEnv) -> Path:
    """The image directory: ``data.path``, or the embedded dataset (generated once, by one process per node)."""
    from .data import ensure_embedded

    d = cfg["data"]
    if d["path"] is None:
        raise ConfigError("no training data: pass --data DIR (an ImageFolder) or --data embedded")
    if d["path"] != "embedded":
        return Path(d["path"])
    cache = Path(d["cache_dir"] or os.environ.get("ESVIT_CACHE") or Path.home() / ".cache" / "esvit")
    args = (cache, d["embedded_images"], d["embedded_classes"], d["embedded_image_size"], 0)
    if env.local_rank == 0:
        root = ensure_embedded(*args, progress=env.is_main and cfg["train"]["progress"], kind=d["embedded_kind"])
    barrier()
    if env.local_rank != 0:
        root = ensure_embedded(*args, kind=d["embedded_kind"])
    return root


def build_loader(cfg: dict, env: DistEnv, root: Path):
    """(dataset, sampler, loader) for this process."""
    from torch.utils.data import DataLoader

    from .data import GlobalBatchSampler, ImageDataset, MultiCropAugmentation, collate_crops

    d, o, seed = cfg["data"], cfg["optim"], cfg["train"]["seed"]
    aug = MultiCropAugmentation(d["global_crop_size"], d["local_crop_size"], tuple(d["global_crops_scale"]),
                                tuple(d["local_crops_scale"]), d["local_crops_number"], blur=d["blur"],
                                solarize=d["solarize"])
    dataset = ImageDataset(root, aug, seed=seed)
    probe = dataset[0]  # fail fast on an unreadable first image
    if "error" in probe:
        raise DataError(probe["error"])
    sampler = GlobalBatchSampler(len(dataset), o["batch_size"], env.rank, env.world_size, seed=seed)
    if sampler.steps_per_epoch == 0:
        raise DataError(f"{root} has {len(dataset)} images, fewer than one global batch of {sampler.global_batch} "
                        f"(optim.batch_size {o['batch_size']} x {env.world_size} processes); lower --batch-size")
    loader = DataLoader(dataset, batch_size=o["batch_size"], sampler=sampler, num_workers=d["num_workers"],
                        collate_fn=collate_crops, pin_memory=env.device.type == "cuda", drop_last=True,
                        generator=torch.Generator(), persistent_workers=False)
    return dataset, sampler, loader


def _gather_rng(env: DistEnv) -> list[dict]:
    state = ckpt.get_rng_state()
    if not env.distributed:
        return [state]
    states: list = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


def pretrain(cfg: dict) -> dict:
    """Run (or resume) the pretraining described by ``cfg``; returns a summary dict.

    Set up for ``torchrun`` (process group from the environment) or a single process. Writes to
    ``train.output``: ``config.yaml``, ``log.jsonl`` (one JSON line per epoch), ``checkpoint.pth`` (every
    epoch and every ``train.save_every`` steps, atomically) and ``checkpointNNNN.pth`` copies. A
    ``checkpoint.pth`` already there is resumed from.
    """
    cfg = from_dict(copy.deepcopy(cfg))
    env = init_distributed(cfg["train"]["device"])
    try:
        return _pretrain(cfg, env)
    finally:
        cleanup()


def _say(env: DistEnv, msg: str) -> None:
    if env.is_main:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def _pretrain(cfg: dict, env: DistEnv) -> dict:
    import yaml
    from tqdm import tqdm

    t, o = cfg["train"], cfg["optim"]
    out = Path(t["output"])
    if env.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the output directory {out}: {exc.strerror or exc}") from None
        ckpt.remove_stale_temps(out)
    if t["deterministic"]:
        torch.use_deterministic_algorithms(True)
    root = resolve_data_root(cfg, env)
    dataset, sampler, loader = build_loader(cfg, env, root)
    spe = sampler.steps_per_epoch

    torch.manual_seed(t["seed"])  # identical initial weights on every rank
    np.random.seed(t["seed"])
    random.seed(t["seed"])
    trainer = Trainer(cfg, steps_per_epoch=spe, env=env)
    torch.manual_seed(t["seed"] + env.rank)  # independent drop-path masks per rank

    path = out / "checkpoint.pth"
    start_epoch, start_step = 0, 0
    sums = {"loss": 0.0, "loss_view": 0.0, "loss_region": 0.0, "steps": 0, "time": 0.0}
    exists = path.exists()
    if env.distributed:  # every rank must see the checkpoint rank 0 resumes from
        seen: list = [None] * env.world_size
        dist.all_gather_object(seen, exists)
        if any(seen) and not all(seen):
            missing = [r for r, s in enumerate(seen) if not s]
            raise CheckpointError(f"{path} exists on some ranks but not on ranks {missing}: the output directory "
                                  "must be shared by all nodes to resume")
    if exists:
        state = ckpt.load_checkpoint(path)
        for w in _check_resumable(state["config"], cfg, state.get("world_size", 1), env.world_size):
            _say(env, f"warning: {w}")
        trainer.load_state_dict(state)
        start_epoch, start_step = int(state["epoch"]), int(state["step_in_epoch"])
        sums = dict(state.get("epoch_stats") or sums)
        rng = state.get("rng") or []
        if len(rng) == env.world_size:
            ckpt.set_rng_state(rng[env.rank])
        else:
            _say(env, f"warning: the checkpoint holds RNG states of {len(rng)} processes, this run has "
                      f"{env.world_size}; they are reseeded")
        _say(env, f"resuming from {path}: epoch {start_epoch}, step {start_step} of {spe} "
                  f"(iteration {trainer.iteration})")
    elif env.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if env.is_main:
        n_params = sum(p.numel() for p in trainer.student_module.backbone.parameters())
        _say(env, f"esvit pretrain: {cfg['model']['arch']} ({n_params / 1e6:.2f}M backbone params), "
                  f"{len(dataset)} images from {root}, {env.world_size} process(es) on {env.device}, global batch "
                  f"{trainer.global_batch}, {spe} steps/epoch, {o['epochs']} epochs, "
                  f"attention backend {cfg['model']['backend']}, loss backend {cfg['loss']['backend']}, "
                  f"precision {t['precision']}")

    def save(epoch: int, step_in_epoch: int) -> None:
        rng = _gather_rng(env)
        if not env.is_main:
            return
        state = trainer.state_dict() | {
            "format": ckpt.FORMAT, "version": ckpt.VERSION, "config": cfg, "epoch": epoch,
            "step_in_epoch": step_in_epoch, "world_size": env.world_size, "epoch_stats": dict(sums), "rng": rng,
        }
        ckpt.atomic_save(state, path)

    last: StepStats | None = None
    history: list[dict] = []
    if start_epoch >= o["epochs"]:
        _say(env, f"{path} already holds all {o['epochs']} epochs; nothing to do")
    for epoch in range(start_epoch, o["epochs"]):
        first = start_step if epoch == start_epoch else 0
        sampler.set_epoch(epoch, first)
        dataset.set_epoch(epoch)
        step = first
        bar = tqdm(total=spe, initial=first, desc=f"epoch {epoch + 1}/{o['epochs']}", unit="step",
                   disable=None if env.is_main and t["progress"] else True,  # None: only on a terminal
                   dynamic_ncols=True, leave=False, file=sys.stderr)
        tick = time.perf_counter()
        for batch in loader:
            if batch.errors:
                raise DataError(batch.errors[0])
            try:
                last = trainer.train_step(batch.crops)
            except NonFiniteLossError as exc:
                kept = (f"the last good checkpoint {path} is kept" if path.exists() and env.is_main
                        else "no checkpoint was written yet")
                raise NonFiniteLossError(f"{exc}: training stopped; {kept}. Try a lower optim.lr, a longer "
                                         "optim.warmup_epochs or train.precision fp32/bf16") from None
            now = time.perf_counter()
            dt, tick = now - tick, now
            step += 1
            for k in ("loss", "loss_view", "loss_region"):
                sums[k] += getattr(last, k)
            sums["steps"] += 1
            sums["time"] += dt
            bar.update(1)
            bar.set_postfix(loss=f"{last.loss:.4f}", lr=f"{last.lr:.2e}", img_s=f"{trainer.global_batch / dt:.1f}")
            if step < spe and t["save_every"] and trainer.iteration % t["save_every"] == 0:
                save(epoch, step)
            if t["stop_at_step"] and trainer.iteration >= t["stop_at_step"] and step < spe:
                save(epoch, step)
                bar.close()
                _say(env, f"stopped at iteration {trainer.iteration} (train.stop_at_step); {path} written")
                return _summary(trainer, history, last, out, stopped=True)
        bar.close()
        n = max(sums["steps"], 1)
        record = {"epoch": epoch, "iteration": trainer.iteration, "loss": sums["loss"] / n,
                  "loss_view": sums["loss_view"] / n, "loss_region": sums["loss_region"] / n,
                  "lr": last.lr if last else None, "wd": last.wd if last else None,
                  "momentum": last.momentum if last else None, "teacher_temp": last.teacher_temp if last else None,
                  "images_per_s": trainer.global_batch * sums["steps"] / max(sums["time"], 1e-9),
                  "epoch_time_s": sums["time"], "global_batch": trainer.global_batch, "world_size": env.world_size}
        history.append(record)
        sums = {"loss": 0.0, "loss_view": 0.0, "loss_region": 0.0, "steps": 0, "time": 0.0}
        save(epoch + 1, 0)
        if env.is_main:
            if t["keep_every"] and (epoch + 1) % t["keep_every"] == 0:
                ckpt.keep_copy(path, out / f"checkpoint{epoch + 1:04d}.pth")
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        _say(env, f"epoch {epoch + 1}/{o['epochs']}  loss {record['loss']:.4f}  (view {record['loss_view']:.4f}, "
                  f"region {record['loss_region']:.4f})  lr {record['lr']:.2e}  "
                  f"{record['images_per_s']:.1f} img/s  {record['epoch_time_s']:.1f}s")
        if t["stop_at_step"] and trainer.iteration >= t["stop_at_step"]:
            _say(env, f"stopped at iteration {trainer.iteration} (train.stop_at_step)")
            return _summary(trainer, history, last, out, stopped=True)
    return _summary(trainer, history, last, out, stopped=False)


def _summary(trainer: Trainer, history: list[dict], last: StepStats | None, out: Path, stopped: bool) -> dict:
    return {"iteration": trainer.iteration, "epochs": history, "last_step": asdict(last) if last else None,
            "output": str(out), "stopped": stopped}
