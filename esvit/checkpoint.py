"""Checkpoints: atomic writes, RNG states as plain tensors / lists, loading with ``weights_only=True``.

A training checkpoint (``OUTPUT/checkpoint.pth``) is a dict of plain types and tensors:

``format`` ("esvit-pretrain"), ``version``, ``config`` (the nested config dict), ``epoch`` (epochs done),
``step_in_epoch`` (steps done in the current epoch), ``iteration`` (global steps done), ``world_size``,
``student`` / ``teacher`` (state dicts of :class:`esvit.models.MultiCropWrapper`: ``backbone.*``, ``head.*``,
``region_head.*``), ``optimizer``, ``scaler`` (or None), ``loss`` (the two centers), ``epoch_stats`` (sums
of the running epoch), ``rng`` (one entry per rank: torch / CUDA / numpy / python states).

It is written to a temporary file in the same directory, fsynced and renamed over the old one, so a crash
(even SIGKILL) in the middle of a write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["FORMAT", "atomic_save", "atomic_write", "get_rng_state", "keep_copy", "load_backbone", "load_checkpoint",
           "global_norm", "named_tensors", "nonfinite", "remove_stale_temps", "set_rng_state"]

FORMAT = "esvit-pretrain"
VERSION = 1


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _WriteErrors:
    """A binary file's ``write`` that remembers the OSError it raised: ``torch.save`` turns a failed write
    (ENOSPC) into an opaque RuntimeError, and :func:`atomic_write` re-raises the real cause."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any]) -> None:
    """``write(f)`` (``f`` has ``write(bytes)``) to a temp file next to ``path``, fsync, rename over ``path``,
    fsync the directory: ``path`` is the old or the new file, never a partial one, whatever stops the process
    when. A failed write (disk full) raises its OSError and leaves ``path`` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            recorder = _WriteErrors(f)
            try:
                write(recorder)
            except Exception:
                if recorder.error is not None:
                    raise recorder.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` of ``obj`` to ``path`` with :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def keep_copy(path: str | os.PathLike, copy_path: str | os.PathLike) -> None:
    """Keep a periodic copy of ``path`` (a hard link when possible -- ``path`` is only ever replaced, never
    written in place -- else a byte copy), atomically."""
    path, copy_path = Path(path), Path(copy_path)
    tmp = copy_path.with_name(f".{copy_path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        import shutil

        shutil.copyfile(path, tmp)
    os.replace(tmp, copy_path)


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files of :func:`atomic_write` left by killed writes; returns what was removed. Call it
    only while no other process writes into ``directory`` (``esvit pretrain`` holds the directory's lock)."""
    removed = []
    for p in Path(directory).glob(".*.tmp-*"):
        if p.is_dir() and not p.is_symlink():  # not ours (e.g. a dataset generated in this directory)
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def named_tensors(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a nested dict / list (a state dict, an optimiser state) with a dotted name."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [nt for k, v in items for nt in named_tensors(v, f"{prefix}.{k}" if prefix else str(k))]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all the floating-point ``tensors`` together, as a 0-d tensor: finite unless an element is
    NaN or infinite -- or the squares overflow, which :func:`nonfinite` tells apart. One fused reduction
    (``torch._foreach_norm``, as gradient clipping uses) and no host sync: checking a whole model for
    non-finite values costs one ``.item()`` in the common case."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return torch.zeros(())
    # one group per device (an optimiser's step counters stay on the CPU next to CUDA weights) and dtype
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in floats:
        groups.setdefault((t.device, t.dtype), []).append(t)
    target = next((dev for dev, _ in groups if dev.type != "cpu"), floats[0].device)
    parts = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ts)).float()).to(target)
             for ts in groups.values()]
    return torch.linalg.vector_norm(torch.stack(parts))


def nonfinite(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors of ``named`` that hold a NaN or an infinity."""
    return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def get_rng_state() -> dict:
    """torch / CUDA / numpy / python RNG states as tensors and plain lists (loadable with weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """A checkpoint written by ``esvit pretrain`` (loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an esvit pretraining checkpoint (no format={FORMAT!r} entry); for "
                              "official Swin / EsViT / timm weights use esvit.models.load_swin_weights")
    return state


def load_backbone(
    path: str | os.PathLike, which: str = "teacher", backend: str = "auto", map_location: Any = "cpu",
    expect_arch: str | None = None,
) -> tuple[nn.Module, dict]:
    """Rebuild the backbone from a pretraining checkpoint's stored config and load its weights.

    Args:
        which: "teacher" (what EsViT evaluates) or "student".
        backend: window-attention backend of the rebuilt Swin.
        expect_arch: when given, a checkpoint of another architecture is an error.
    Returns:
        (backbone in eval mode, the checkpoint's config dict).
    """
    from .models import create_backbone

    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    state = load_checkpoint(path, map_location)
    cfg = state["config"]
    arch = cfg["model"]["arch"]
    if expect_arch is not None and arch != expect_arch:
        raise CheckpointError(f"{path} holds a {arch} backbone, not {expect_arch}")
    kwargs = {"patch_size": cfg["model"]["patch_size"]} if arch in ("deit_small", "vit_base") else {}
    model = create_backbone(arch, window_size=cfg["model"]["window_size"], img_size=cfg["data"]["global_crop_size"],
                            backend=backend, drop_path_rate=0.0, **kwargs)
    sd = {k[len("backbone."):]: v for k, v in state[which].items() if k.startswith("backbone.")}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the {which} weights in {path} do not fit a {arch} backbone: {exc}") from exc
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return model.eval(), cfg
