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
from . import rundir
from .config import SCHEMA, from_dict
from .distributed import DistEnv, all_reduce_mean, barrier, cleanup, convert_sync_batchnorm, init_distributed
from .errors import CheckpointError, ConfigError, DataError, EsvitError, TrainingError
from .losses import EsViTLoss
from .models import VIT_ARCHS, DINOHead, MultiCropWrapper, create_backbone
from .schedules import cosine_scheduler, teacher_temp_schedule

__all__ = ["NonFiniteError", "NonFiniteLossError", "StepStats", "Trainer", "build_backbone", "clip_gradients",
           "param_groups", "pretrain"]

_AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteError(TrainingError):
    """NaN or infinity in the loss, the weights, the optimiser state or the centers; nothing non-finite is
    written to a checkpoint."""


class NonFiniteLossError(NonFiniteError):
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
        self._student_named = [(f"student.{n}", p) for n, p in student.named_parameters()]
        self._student_params = [p for _, p in self._student_named]
        self._teacher_params = list(teacher.parameters())

        self.loss = EsViTLoss(head.last_layer.weight_v.shape[0], view_weight=lo["view_weight"],
                              region_weight=lo["region_weight"], student_temp=lo["student_temp"],
                              center_momentum=lo["center_momentum"], backend=lo["backend"],
                              region_teacher_temp=lo["region_teacher_temp"],
                              region_center_momentum=lo["region_center_momentum"]).to(self.device)
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

    def schedule_at(self, iteration: int) -> dict[str, float]:
        """LR, weight decay, teacher momentum and teacher temperature of ``iteration``."""
        return {"lr": self._sched(self.lr_schedule, iteration), "wd": self._sched(self.wd_schedule, iteration),
                "momentum": self._sched(self.momentum_schedule, iteration),
                "teacher_temp": self._sched(self.teacher_temps, iteration // self.steps_per_epoch)}

    def nonfinite_state(self) -> list[str]:
        """Names of the student / teacher / optimiser-state / center tensors holding a NaN or an infinity."""
        return self._nonfinite([*ckpt.named_tensors(self.student_module.state_dict(), "student"),
                                *ckpt.named_tensors(self.teacher.state_dict(), "teacher"),
                                *ckpt.named_tensors(self.optimizer.state_dict()["state"], "optimizer"),
                                *ckpt.named_tensors(self.loss.state_dict(), "loss")])

    def _nonfinite(self, named: list[tuple[str, torch.Tensor]]) -> list[str]:
        """Names of the non-finite tensors of ``named``; [] in the common case at the price of one fused
        reduction and one sync. Every rank reaches the same verdict (a rank with none names another's)."""
        norm = all_reduce_mean(ckpt.global_norm([t for _, t in named]).to(self.device).reshape(1))
        if math.isfinite(norm.item()):
            return []
        bad = ckpt.nonfinite(named)  # exact: the norm also overflows on huge finite values
        anywhere = all_reduce_mean(torch.tensor([float(len(bad))], device=self.device)).item() > 0
        return bad or (["(on another process)"] if anywhere else [])

    def train_step(self, crops: list[torch.Tensor]) -> StepStats:
        """One optimisation step on ``crops`` = [global_1, global_2, local_1, ...] (each (B, 3, H, W))."""
        if len(crops) < 2 or crops[0].shape != crops[1].shape:
            raise ValueError("crops must start with the two global crops (same shape)")
        it, epoch = self.iteration, self.epoch
        sched = self.schedule_at(it)
        lr, wd, momentum, temp = sched["lr"], sched["wd"], sched["momentum"], sched["teacher_temp"]
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
        # the loss was finite, but the update may not be (a huge LR): check before the teacher takes it in
        bad = self._nonfinite(self._student_named)
        if bad:
            raise NonFiniteError(f"the update of iteration {it} (epoch {epoch}) made {len(bad)} of the student's "
                                 f"weights non-finite (e.g. {bad[0]}; loss {loss_v}, lr {lr:.3g})")

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
    """Errors on changes that make the checkpoint meaningless; returns warnings for the tolerated ones.

    A field missing from ``old`` (a checkpoint written before the field existed) counts as its default: that
    run behaved as the default does, so adding a field never strands an older run."""
    diffs = []
    for section in ("model", "head", "loss", "data", "optim"):
        for key, value in new[section].items():
            field = SCHEMA.get(section, {}).get(key)
            was = old.get(section, {}).get(key, field.default if field is not None else None)
            if was != value and f"{section}.{key}" not in _RESUMABLE_CHANGES:
                diffs.append(f"{section}.{key}: {was!r} -> {value!r}")
    if diffs:
        raise ConfigError("the output directory holds a checkpoint of another configuration ("
                          + "; ".join(diffs) + "); use a new --output or remove its checkpoint.pth")
    warnings = []
    old_gb, new_gb = old["optim"]["batch_size"] * old_world, new["optim"]["batch_size"] * new_world
    if old_gb != new_gb:
        raise ConfigError(f"the checkpoint was trained with a global batch of {old_gb}, this run has {new_gb} "
                          f"(batch_size x processes); keep the global batch to resume")
    if old["data"]["path"] != new["data"]["path"]:
        warnings.append(f"data.path changed {old['data']['path']} -> {new['data']['path']}: resuming on other data")
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
    ``checkpoint.pth`` already there is resumed from. The directory is locked for the run (rank 0 holds
    the lock): a second run on it is refused.
    """
    cfg = from_dict(copy.deepcopy(cfg))
    env = init_distributed(cfg["train"]["device"])
    lock = None
    try:  # mistakes found before the data and the model are built cost nothing
        _check_backends(cfg, env.device)
        lock = _prepare_output(cfg, env)
        return _pretrain(cfg, env)
    finally:
        if lock is not None:
            lock.release()
        cleanup()


def _say(env: DistEnv, msg: str) -> None:
    if env.is_main:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def _on_main(env: DistEnv, fn):
    """``fn()`` on rank 0; an :class:`EsvitError` it raises is raised on every rank (no rank waits for a
    peer that has stopped). Returns ``fn``'s result on rank 0, None elsewhere."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except EsvitError as exc:
            error = exc
    if env.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
    return result


def _prepare_output(cfg: dict, env: DistEnv) -> rundir.OutputLock | None:
    """Create, lock and clean the output directory (on rank 0; its errors are raised on every rank)."""
    out = Path(cfg["train"]["output"])

    def prepare() -> rundir.OutputLock:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the output directory {out}: {exc.strerror or exc}") from None
        lock, warning = rundir.lock_output(out)
        if warning:
            _say(env, f"warning: {warning}")
        ckpt.remove_stale_temps(out)  # no other run writes here: we hold the lock
        return lock

    return _on_main(env, prepare)


def _check_backends(cfg: dict, device: torch.device) -> None:
    """A kernel backend named in the config that cannot run on ``device`` is a ConfigError now, not a
    traceback at the first step."""
    from esvit_kernels.backends import BackendUnavailableError, resolve_backend

    checks = [("loss.backend", cfg["loss"]["backend"], "dino_loss")]
    if cfg["loss"]["region_weight"] > 0:
        checks.append(("loss.backend", cfg["loss"]["backend"], "multi_region_loss"))
    if cfg["model"]["arch"].startswith("swin"):
        checks.insert(0, ("model.backend", cfg["model"]["backend"], "window_attention"))
    for key, backend, op in checks:
        try:
            resolve_backend(backend, device, op)
        except BackendUnavailableError as exc:
            raise ConfigError(f"{key} = {backend!r} cannot run here: {exc}; use --backend auto (or torch)") from None


def _check_same_data(state: dict, n_images: int, spe: int, root: Path, global_batch: int) -> str | None:
    """Refuse resuming on data whose size changes the steps per epoch (the epoch, step and schedule
    positions of the checkpoint would not fit); returns a warning when only the size changed."""
    old_n, old_spe = state.get("dataset_size"), state.get("steps_per_epoch")
    epoch, step, it = int(state["epoch"]), int(state["step_in_epoch"]), int(state["iteration"])
    if old_spe is None:  # a checkpoint of an older version: its position must fit this epoch length
        old_spe = spe if it == epoch * spe + step and step < spe else None
    if old_spe != spe:
        was = f"{old_n} images ({old_spe} steps" if old_n is not None else "data of another size (other steps"
        raise ConfigError(f"the checkpoint was trained on {was} per epoch at a global batch of {global_batch}); "
                          f"{root} has {n_images} images ({spe} steps per epoch), so its epoch, step and schedules "
                          "would not fit: resume with the data it was trained on, or start a new run in another "
                          "--output")
    if old_n is not None and old_n != n_images:
        return (f"the checkpoint was trained on {old_n} images, {root} has {n_images}: the steps per epoch are the "
                "same, so it resumes, but its batches are not those of an uninterrupted run")
    return None


def _write_error(exc: OSError, path: Path, kept: str) -> TrainingError:
    """The one-line error of a failed write (disk full, ...), saying what is intact."""
    return TrainingError(f"cannot write {path}: {exc.strerror or exc}; {kept}. Free some space and "
                         "run the same command again to resume")


def enable_determinism() -> None:
    """``torch.use_deterministic_algorithms(True)``. On a GPU, cuBLAS is deterministic only with a fixed
    workspace, which ``CUBLAS_WORKSPACE_CONFIG`` must choose before cuBLAS is first used in the process (else
    the first matmul raises); a value the user set is kept."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def _pretrain(cfg: dict, env: DistEnv) -> dict:
    import yaml
    from tqdm import tqdm

    t, o = cfg["train"], cfg["optim"]
    out = Path(t["output"])
    if t["deterministic"]:
        enable_determinism()
    root = resolve_data_root(cfg, env)
    dataset, sampler, loader = build_loader(cfg, env, root)
    spe = sampler.steps_per_epoch

    torch.manual_seed(t["seed"])  # identical initial weights on every rank
    np.random.seed(t["seed"])
    random.seed(t["seed"])
    trainer = Trainer(cfg, steps_per_epoch=spe, env=env)
    torch.manual_seed(t["seed"] + env.rank)  # independent drop-path masks per rank

    path, log_path = out / "checkpoint.pth", out / "log.jsonl"
    start_epoch, start_step = 0, 0
    sums = {"loss": 0.0, "loss_view": 0.0, "loss_region": 0.0, "steps": 0, "time": 0.0}
    history: list[dict] = []  # the records of every finished epoch (log.jsonl's lines)
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
        warning = _check_same_data(state, len(dataset), spe, root, trainer.global_batch)
        if warning:
            _say(env, f"warning: {warning}")
        trainer.load_state_dict(state)
        bad = trainer.nonfinite_state()
        if bad:
            raise CheckpointError(f"{path} holds non-finite values in {len(bad)} tensors (e.g. {bad[0]}; written by "
                                  "an older version): remove it to start afresh, or copy a good checkpointNNNN.pth "
                                  "over it")
        start_epoch, start_step = int(state["epoch"]), int(state["step_in_epoch"])
        sums = dict(state.get("epoch_stats") or sums)
        history = state.get("log")
        if history is None:  # an older checkpoint: its epochs' lines are those of the log
            history = [r for r in rundir.read_log(log_path) if r.get("epoch", start_epoch) < start_epoch]
        rng = state.get("rng") or []
        if len(rng) == env.world_size:
            ckpt.set_rng_state(rng[env.rank])
        else:
            _say(env, f"warning: the checkpoint holds RNG states of {len(rng)} processes, this run has "
                      f"{env.world_size}; they are reseeded")
        if env.is_main and rundir.read_log(log_path) != history:  # e.g. the line of an epoch about to be redone
            try:
                rundir.write_log(log_path, history)
            except OSError as exc:
                raise _write_error(exc, log_path, f"the checkpoint {path} is intact") from None
            _say(env, f"{log_path} rewritten from the checkpoint ({len(history)} epochs)")
        _say(env, f"resuming from {path}: epoch {start_epoch}, step {start_step} of {spe} "
                  f"(iteration {trainer.iteration})")
    elif env.is_main:
        if log_path.exists():
            moved = rundir.move_aside(log_path)
            _say(env, f"a fresh run (no {path.name}): the earlier {log_path.name} is kept as {moved.name}")
        try:
            (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        except OSError as exc:
            raise _write_error(exc, out / "config.yaml", "no checkpoint was written yet") from None
    if env.is_main:
        n_params = sum(p.numel() for p in trainer.student_module.backbone.parameters())
        _say(env, f"esvit pretrain: {cfg['model']['arch']} ({n_params / 1e6:.2f}M backbone params), "
                  f"{len(dataset)} images from {root}, {env.world_size} process(es) on {env.device}, global batch "
                  f"{trainer.global_batch}, {spe} steps/epoch, {o['epochs']} epochs, "
                  f"attention backend {cfg['model']['backend']}, loss backend {cfg['loss']['backend']}, "
                  f"precision {t['precision']}")

    saved = f"{path} (epoch {start_epoch}, step {start_step})" if exists else None

    def kept(which: str = "last good") -> str:
        return f"the {which} checkpoint {saved} is kept" if saved else "no checkpoint was written yet"

    def save(epoch: int, step_in_epoch: int, log: bool = False) -> None:
        """Checkpoint (after checking that every tensor is finite); with ``log``, first replace log.jsonl by
        ``history`` -- the order that keeps every epoch of the checkpoint in the log whenever the run dies."""
        nonlocal saved
        bad = trainer.nonfinite_state()
        if bad:
            raise NonFiniteError(f"{len(bad)} tensors of the model / optimiser state / centers are non-finite at "
                                 f"iteration {trainer.iteration} (e.g. {', '.join(bad[:3])}); nothing was saved")
        rng = _gather_rng(env)
        if not env.is_main:
            saved = f"{path} (epoch {epoch}, step {step_in_epoch})"  # rank 0 writes it (or stops the run)
            return
        state = trainer.state_dict() | {
            "format": ckpt.FORMAT, "version": ckpt.VERSION, "config": cfg, "epoch": epoch,
            "step_in_epoch": step_in_epoch, "world_size": env.world_size, "epoch_stats": dict(sums), "rng": rng,
            "dataset_size": len(dataset), "steps_per_epoch": spe, "log": history,
        }
        target = log_path
        try:
            if log:
                rundir.write_log(log_path, history)
            target = path
            ckpt.atomic_save(state, path)
            saved = f"{path} (epoch {epoch}, step {step_in_epoch})"
            if log and t["keep_every"] and epoch % t["keep_every"] == 0:
                target = out / f"checkpoint{epoch:04d}.pth"
                ckpt.keep_copy(path, target)
        except OSError as exc:
            raise _write_error(exc, target, kept("previous")) from None

    summary: list[dict] = []  # this invocation's epochs
    last: StepStats | None = None
    if start_epoch >= o["epochs"]:
        _say(env, f"{path} already holds all {o['epochs']} epochs; nothing to do")
    try:
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
                last = trainer.train_step(batch.crops)
                now = time.perf_counter()
                dt, tick = now - tick, now
                step += 1
                for k in ("loss", "loss_view", "loss_region"):
                    sums[k] += getattr(last, k)
                sums["steps"] += 1
                sums["time"] += dt
                bar.update(1)
                bar.set_postfix(loss=f"{last.loss:.4f}", lr=f"{last.lr:.2e}",
                                img_s=f"{trainer.global_batch / dt:.1f}")
                if step < spe and t["save_every"] and trainer.iteration % t["save_every"] == 0:
                    save(epoch, step)
                if t["stop_at_step"] and trainer.iteration >= t["stop_at_step"] and step < spe:
                    save(epoch, step)
                    bar.close()
                    _say(env, f"stopped at iteration {trainer.iteration} (train.stop_at_step); {path} written")
                    return _summary(trainer, summary, last, out, stopped=True)
            bar.close()
            n = max(sums["steps"], 1)
            record = {"epoch": epoch, "iteration": trainer.iteration, "loss": sums["loss"] / n,
                      "loss_view": sums["loss_view"] / n, "loss_region": sums["loss_region"] / n,
                      **trainer.schedule_at(trainer.iteration - 1),
                      "images_per_s": trainer.global_batch * sums["steps"] / max(sums["time"], 1e-9),
                      "epoch_time_s": sums["time"], "global_batch": trainer.global_batch,
                      "world_size": env.world_size}
            history.append(record)
            summary.append(record)
            sums = {"loss": 0.0, "loss_view": 0.0, "loss_region": 0.0, "steps": 0, "time": 0.0}
            save(epoch + 1, 0, log=True)
            _say(env, f"epoch {epoch + 1}/{o['epochs']}  loss {record['loss']:.4f}  (view {record['loss_view']:.4f}, "
                      f"region {record['loss_region']:.4f})  lr {record['lr']:.2e}  "
                      f"{record['images_per_s']:.1f} img/s  {record['epoch_time_s']:.1f}s")
            if t["stop_at_step"] and trainer.iteration >= t["stop_at_step"]:
                _say(env, f"stopped at iteration {trainer.iteration} (train.stop_at_step)")
                return _summary(trainer, summary, last, out, stopped=True)
    except NonFiniteError as exc:
        raise type(exc)(f"{exc}: training stopped; {kept()}. Try a lower optim.lr, a longer optim.warmup_epochs "
                        "or train.precision fp32/bf16") from None
    return _summary(trainer, summary, last, out, stopped=False)


def _summary(trainer: Trainer, history: list[dict], last: StepStats | None, out: Path, stopped: bool) -> dict:
    return {"iteration": trainer.iteration, "epochs": history, "last_step": asdict(last) if last else None,
            "output": str(out), "stopped": stopped}
