"""Pretraining configuration: a typed schema with defaults and help, YAML presets, command-line overrides.

A config is a plain nested dict ``{section: {key: value}}`` (so it is stored in checkpoints as plain Python
types). Sources, later wins: the schema's defaults, the YAML file (which may name a ``base`` YAML it
extends, relative to itself), ``section.key=value`` overrides, explicit CLI flags. Unknown sections or
keys, wrong types and settings that cannot work raise :class:`esvit.errors.ConfigError` with a message
naming the key.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["SCHEMA", "Field", "apply_overrides", "default_config", "describe", "from_dict", "load_config",
           "set_value", "validate"]


@dataclass(frozen=True)
class Field:
    default: Any
    help: str
    kind: str = ""  # "int" | "float" | "bool" | "str" | "float_pair" | "opt_float" | "opt_str"; "" = from default

    @property
    def type(self) -> str:
        if self.kind:
            return self.kind
        d = self.default
        return {bool: "bool", int: "int", float: "float", str: "str"}[type(d)]


SCHEMA: dict[str, dict[str, Field]] = {
    "model": {
        "arch": Field("swin_tiny", "backbone: swin_micro | swin_micro_conv | swin_tiny | swin_small | swin_base | "
                                   "deit_small | vit_base | resnet50 | cvt_micro | cvt_v4_s1(_rpe)(_shift) | "
                                   "vil_micro | vil_2262 | vil_small"),
        "window_size": Field(7, "Swin window size W (7 or 14); a stage whose map is <= W at the global crop "
                                "size uses its map size and no shift"),
        "patch_size": Field(16, "ViT patch size (deit_small / vit_base)"),
        "drop_path_rate": Field(None, "student stochastic depth; null = the architecture's default "
                                      "(T 0.1, S/B 0.2); the teacher always uses 0", "opt_float"),
        "backend": Field("auto", "window-attention kernels: auto | triton | cuda | torch (torch = eager reference)"),
        "use_checkpoint": Field(False, "gradient checkpointing of every block (less memory, more compute)"),
        "compile": Field(False, "torch.compile the student and teacher backbones"),
    },
    "head": {
        "out_dim": Field(65536, "K, the output dimension of both DINO heads"),
        "hidden_dim": Field(2048, "hidden width of the heads' MLP"),
        "bottleneck_dim": Field(256, "bottleneck (L2-normalised) width of the heads"),
        "nlayers": Field(3, "Linear layers of the heads' MLP"),
        "norm_last_layer": Field(False, "freeze the weight-norm gain of the heads' last layer at 1"),
        "use_bn": Field(False, "BatchNorm in the heads' MLP"),
    },
    "loss": {
        "view_weight": Field(0.5, "weight w_v of the view loss L_V (> 0); ignored (1.0) when region_weight is 0"),
        "region_weight": Field(0.5, "weight w_r of the region loss L_R; 0 trains 'V only' (no region head) with "
                                    "the official view-only loss, view_weight 1.0"),
        "student_temp": Field(0.1, "student temperature"),
        "warmup_teacher_temp": Field(0.04, "teacher temperature at epoch 0"),
        "teacher_temp": Field(0.07, "teacher temperature after the warmup"),
        "warmup_teacher_temp_epochs": Field(30, "epochs of linear teacher-temperature warmup"),
        "center_momentum": Field(0.9, "EMA momentum of the two centers"),
        "region_teacher_temp": Field(None, "constant teacher temperature of the region targets; null (official): "
                                           "the view's schedule", "opt_float"),
        "region_center_momentum": Field(None, "EMA momentum of the region center; null (official): "
                                              "center_momentum", "opt_float"),
        "backend": Field("auto", "loss kernels: auto | triton | torch"),
    },
    "data": {
        "path": Field(None, "ImageFolder directory, or 'embedded' for the generated dataset", "opt_str"),
        "global_crop_size": Field(224, "global crop size (px); also the model's img_size"),
        "local_crop_size": Field(96, "local crop size (px)"),
        "global_crops_scale": Field([0.4, 1.0], "RandomResizedCrop scale range of the global crops", "float_pair"),
        "local_crops_scale": Field([0.05, 0.4], "RandomResizedCrop scale range of the local crops", "float_pair"),
        "local_crops_number": Field(8, "local crops per image (0 = the two global crops only)"),
        "blur": Field(True, "Gaussian blur (p 1.0 / 0.1 / 0.5 on global 1 / global 2 / local crops) as DINO; "
                            "false drops it (radius 0.1-2 px wipes out fine patterns in 32-64 px crops)"),
        "solarize": Field(True, "solarization (p 0.2) of the second global crop as DINO"),
        "num_workers": Field(8, "data-loading worker processes per training process"),
        "embedded_images": Field(2000, "images of the embedded dataset"),
        "embedded_kind": Field("textures", "the embedded dataset's generator: textures (10 pattern classes in "
                                           "smooth colour fields) | shapes (up to 32 shape x texture classes)"),
        "embedded_classes": Field(10, "classes of the embedded dataset (<= 10 for textures, <= 32 for shapes)"),
        "embedded_image_size": Field(96, "image size (px) of the embedded dataset"),
        "cache_dir": Field(None, "where the embedded dataset is generated (default $ESVIT_CACHE or "
                                 "~/.cache/esvit)", "opt_str"),
    },
    "optim": {
        "epochs": Field(300, "training epochs"),
        "batch_size": Field(32, "images per process and step (global batch = batch_size x processes)"),
        "lr": Field(5e-4, "peak learning rate for a global batch of 256 (scaled linearly by global_batch/256)"),
        "min_lr": Field(1e-6, "final learning rate of the cosine"),
        "warmup_epochs": Field(10, "epochs of linear learning-rate warmup"),
        "weight_decay": Field(0.04, "initial weight decay (cosine schedule)"),
        "weight_decay_end": Field(0.4, "final weight decay"),
        "clip_grad": Field(3.0, "per-parameter gradient-norm clipping as DINO/EsViT (0 = off)"),
        "freeze_last_layer": Field(1, "epochs during which the heads' last layers get no update"),
        "momentum_teacher": Field(0.996, "initial teacher EMA momentum (cosine to 1)"),
    },
    "train": {
        "output": Field("runs/esvit", "output directory: log.jsonl, checkpoint.pth, config.yaml"),
        "device": Field("auto", "auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)"),
        "precision": Field("fp32", "fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)"),
        "seed": Field(0, "random seed"),
        "save_every": Field(0, "also checkpoint every N steps (0 = at the end of every epoch only)"),
        "keep_every": Field(0, "keep a copy checkpoint{epoch:04d}.pth every N epochs (0 = none)"),
        "stop_at_step": Field(0, "stop (with a checkpoint) once this global step is reached (0 = never)"),
        "progress": Field(True, "show a progress bar"),
        "deterministic": Field(False, "torch.use_deterministic_algorithms (reproducible, slower on GPU)"),
    },
}

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def default_config() -> dict[str, dict[str, Any]]:
    """The schema's defaults as a fresh nested dict."""
    return {s: {k: copy.deepcopy(f.default) for k, f in fields.items()} for s, fields in SCHEMA.items()}


def _field(section: str, key: str) -> Field:
    if section not in SCHEMA:
        hint = difflib.get_close_matches(section, SCHEMA, n=1)
        raise ConfigError(f"unknown config section {section!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; sections: {', '.join(SCHEMA)}")
    fields = SCHEMA[section]
    if key not in fields:
        names = [f"{section}.{k}" for k in fields]
        hint = difflib.get_close_matches(f"{section}.{key}", names, n=1)
        raise ConfigError(f"unknown config key {section}.{key}" + (f" (did you mean {hint[0]}?)" if hint else "")
                          + f"; keys of {section!r}: {', '.join(fields)}")
    return fields[key]


def _coerce(name: str, value: Any, f: Field) -> Any:
    """``value`` converted to the field's type, or a ConfigError."""
    t = f.type

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{name} must be {what}, got {value!r}")

    if t.startswith("opt_"):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        t = t[4:]
    if t == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise bad("true or false")
    if t == "int":
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad("an integer")
    if t == "float":
        if isinstance(value, bool):
            raise bad("a number")
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
        if not math.isfinite(x):  # no field means anything at inf / nan (inf >= 0 would pass the range checks)
            raise bad("a finite number")
        return x
    if t == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if t == "float_pair":
        if isinstance(value, str):
            value = [v for v in value.replace("[", " ").replace("]", " ").replace(",", " ").split() if v]
        if isinstance(value, (list, tuple)) and len(value) == 2:
            try:
                pair = [float(value[0]), float(value[1])]
            except (TypeError, ValueError):
                pass
            else:
                if all(map(math.isfinite, pair)):
                    return pair
        raise bad("a pair of finite numbers like [0.4, 1.0]")
    raise AssertionError(t)


def set_value(cfg: dict, dotted: str, value: Any) -> None:
    """Set ``section.key`` of ``cfg`` to ``value`` (type-checked)."""
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"config keys are written section.key (e.g. optim.lr), got {dotted!r}")
    f = _field(*parts)
    cfg[parts[0]][parts[1]] = _coerce(dotted, value, f)


def _merge(cfg: dict, data: Any, origin: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section == "base":
            continue
        if section not in SCHEMA:
            try:
                _field(str(section), "")
            except ConfigError as exc:
                raise ConfigError(f"{origin}: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            try:
                set_value(cfg, f"{section}.{key}", value)
            except ConfigError as exc:
                raise ConfigError(f"{origin}: {exc}") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    import yaml

    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' includes form a cycle")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    layers: list[tuple[dict, str]] = []
    if isinstance(data, dict) and data.get("base"):
        layers = _read_yaml(path.parent / str(data["base"]), seen + (path,))
    return layers + [(data, str(path))]


def from_dict(data: dict) -> dict:
    """A full, validated config from a possibly partial nested dict (missing fields take their defaults)."""
    cfg = default_config()
    _merge(cfg, data, "config")
    return validate(cfg)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults <- YAML ``path`` (and its ``base`` chain) <- ``section.key=value`` overrides. Not validated."""
    cfg = default_config()
    if path is not None:
        for data, origin in _read_yaml(Path(path)):
            _merge(cfg, data, origin)
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars / lists)."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_value(cfg, key.strip(), value)
    return cfg


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: dict) -> dict:
    """Check that every key is known and typed and that the settings can work; returns ``cfg``."""
    from .data.synthetic import DATASET_KINDS, max_classes
    from .models import ARCHS, min_crop_size

    for section, values in cfg.items():
        for key, value in values.items():
            cfg[section][key] = _coerce(f"{section}.{key}", value, _field(section, key))
    for section, fields in SCHEMA.items():
        for key in fields:
            _check(key in cfg.get(section, {}), f"config key {section}.{key} is missing")
    m, h, lo, d, o, t = (cfg[s] for s in ("model", "head", "loss", "data", "optim", "train"))
    _check(m["arch"] in ARCHS, f"model.arch {m['arch']!r} is unknown; choose one of {', '.join(ARCHS)}")
    _check(m["window_size"] >= 1, f"model.window_size must be >= 1, got {m['window_size']}")
    _check(m["patch_size"] >= 1, f"model.patch_size must be >= 1, got {m['patch_size']}")
    _check(m["drop_path_rate"] is None or 0 <= m["drop_path_rate"] < 1, "model.drop_path_rate must be in [0, 1)")
    backends = ("auto", "triton", "cuda", "torch")
    _check(m["backend"] in backends, f"model.backend must be one of {backends}, got {m['backend']!r}")
    _check(lo["backend"] in backends, f"loss.backend must be one of {backends}, got {lo['backend']!r}")
    for k in ("out_dim", "hidden_dim", "bottleneck_dim", "nlayers"):
        _check(h[k] >= 1, f"head.{k} must be >= 1, got {h[k]}")
    _check(lo["view_weight"] > 0, f"loss.view_weight must be > 0, got {lo['view_weight']}")
    _check(lo["region_weight"] >= 0, f"loss.region_weight must be >= 0, got {lo['region_weight']}")
    if lo["region_weight"] == 0:  # 'V only' is the official DINO loss at full weight, however it is asked for
        lo["view_weight"] = 1.0
    for k in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
        _check(lo[k] > 0, f"loss.{k} must be > 0, got {lo[k]}")
    _check(0 <= lo["center_momentum"] < 1, "loss.center_momentum must be in [0, 1)")
    _check(lo["region_teacher_temp"] is None or lo["region_teacher_temp"] > 0, "loss.region_teacher_temp must be > 0")
    _check(lo["region_center_momentum"] is None or 0 <= lo["region_center_momentum"] < 1,
           "loss.region_center_momentum must be in [0, 1)")
    _check(lo["warmup_teacher_temp_epochs"] >= 0, "loss.warmup_teacher_temp_epochs must be >= 0")
    patch = min_crop_size(m["arch"], m["patch_size"])
    for k in ("global_crop_size", "local_crop_size"):
        _check(d[k] >= patch, f"data.{k} = {d[k]} px is smaller than one patch of {m['arch']} ({patch} px)")
    for k in ("global_crops_scale", "local_crops_scale"):
        a, b = d[k]
        _check(0 < a <= b <= 1, f"data.{k} must satisfy 0 < min <= max <= 1, got {d[k]}")
    _check(d["local_crops_number"] >= 0, "data.local_crops_number must be >= 0")
    _check(d["num_workers"] >= 0, "data.num_workers must be >= 0")
    _check(d["embedded_kind"] in DATASET_KINDS, f"data.embedded_kind must be one of {', '.join(DATASET_KINDS)}")
    top = max_classes(d["embedded_kind"])
    _check(1 <= d["embedded_classes"] <= top,
           f"data.embedded_classes must be in [1, {top}] for the {d['embedded_kind']} dataset")
    _check(d["embedded_images"] >= d["embedded_classes"], "data.embedded_images must be >= data.embedded_classes")
    _check(d["embedded_image_size"] >= 16, "data.embedded_image_size must be >= 16")
    _check(o["epochs"] >= 1, f"optim.epochs must be >= 1, got {o['epochs']}")
    _check(o["batch_size"] >= 1, f"optim.batch_size must be >= 1, got {o['batch_size']}")
    for k in ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad"):
        _check(o[k] >= 0, f"optim.{k} must be >= 0, got {o[k]}")
    _check(o["warmup_epochs"] >= 0, "optim.warmup_epochs must be >= 0")
    _check(o["freeze_last_layer"] >= 0, "optim.freeze_last_layer must be >= 0")
    _check(0 <= o["momentum_teacher"] <= 1, "optim.momentum_teacher must be in [0, 1]")
    _check(t["precision"] in ("fp32", "bf16", "fp16"), f"train.precision must be fp32, bf16 or fp16, "
                                                       f"got {t['precision']!r}")
    dev = t["device"]
    _check(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
           f"train.device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    for k in ("save_every", "keep_every", "stop_at_step"):
        _check(t[k] >= 0, f"train.{k} must be >= 0")
    return cfg


def describe() -> str:
    """Every field with its default and help, for ``esvit pretrain --help``."""
    import yaml

    lines = []
    for section, fields in SCHEMA.items():
        lines.append(f"{section}:")
        for key, f in fields.items():
            default = yaml.safe_dump(f.default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"  {section}.{key} = {default}")
            lines.append(f"      {f.help}")
    return "\n".join(lines)
