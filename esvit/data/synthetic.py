"""Generated, labelled image datasets, so a demo or a test never downloads anything.

Two kinds (``kind=``):

* ``"textures"`` (the default; what the demo pretrains on): 10 classes of full-image patterns -- stripes,
  checker, dots, grid, rings, waves, zigzag, blobs, radial, hatch -- each with a random orientation,
  period and phase, drawn in two colour *fields* that vary smoothly over the image (ink = a bicubic
  3x3 random colour field at half brightness, paper = ink + 128, the two swapped at random). Every crop
  of an image shows the same pattern class but other colours, so the one thing the multi-crop objective
  can agree on across views is the pattern -- and a random network's features, dominated by colour,
  know little of it.
* ``"shapes"``: up to 32 classes, each a (shape, texture) pair -- 8 shapes (circle, square, triangle,
  hexagon, star, cross, ring, crescent) x 4 textures (solid, stripes, dots, checker) -- drawn with a random
  colour, position, scale and rotation over a random background (solid, gradient, noise or blobs with
  distractors). Harder: a few CPU minutes of pretraining do not learn it (README, "The demo").

Images are a pure function of (kind, seed, index): the same arguments give the same bytes.

Layout: ``DIR/train/<class>/<class>_<index>.png`` (and ``DIR/val/...`` with ``val_fraction > 0``), plus
``DIR/esvit_dataset.json`` written last (its presence marks a complete dataset).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError

__all__ = ["DATASET_KINDS", "MAX_CLASSES", "META_FILE", "PATTERNS", "class_names", "ensure_embedded", "make_dataset",
           "max_classes", "render_image"]

DATASET_KINDS = ("textures", "shapes")
PATTERNS = ("stripes", "checker", "dots", "grid", "rings", "waves", "zigzag", "blobs", "radial", "hatch")
SHAPES = ("circle", "square", "triangle", "hexagon", "star", "cross", "ring", "crescent")
TEXTURES = ("solid", "stripes", "dots", "checker")
MAX_CLASSES = {"textures": len(PATTERNS), "shapes": len(SHAPES) * len(TEXTURES)}
META_FILE = "esvit_dataset.json"
FORMAT_VERSION = 2
_SS = 4  # supersampling of the shape mask (anti-aliased edges)


def _class_pair(i: int) -> tuple[str, str]:
    return SHAPES[i % len(SHAPES)], TEXTURES[(i + i // len(SHAPES)) % len(TEXTURES)]


def _check_kind(kind: str) -> None:
    if kind not in DATASET_KINDS:
        raise DataError(f"unknown dataset kind {kind!r}; choose one of {', '.join(DATASET_KINDS)}")


def max_classes(kind: str = "textures") -> int:
    """How many classes the generator of ``kind`` has (textures 10, shapes 32)."""
    _check_kind(kind)
    return MAX_CLASSES[kind]


def class_names(num_classes: int, kind: str = "textures") -> list[str]:
    """Directory names of the first ``num_classes`` classes, e.g. ``03_grid`` or ``03_hexagon_checker``."""
    _check_kind(kind)
    if kind == "textures":
        return [f"{i:02d}_{PATTERNS[i]}" for i in range(num_classes)]
    return [f"{i:02d}_{'_'.join(_class_pair(i))}" for i in range(num_classes)]


def _polygon(n: int, cx: float, cy: float, r: float, theta: float, radii: list[float] | None = None) -> list:
    radii = radii or [1.0]
    pts = []
    for k in range(n):
        a = theta + 2 * math.pi * k / n
        rr = r * radii[k % len(radii)]
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _cross(cx: float, cy: float, r: float, theta: float) -> list:
    w = 0.35 * r
    base = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
    c, s = math.cos(theta), math.sin(theta)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """Anti-aliased (size, size) float mask in [0, 1] of one shape."""
    big = size * _SS
    cx, cy, r = cx * _SS, cy * _SS, r * _SS
    img = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        d.polygon(_polygon(4, cx, cy, r, theta), fill=255)
    elif shape == "triangle":
        d.polygon(_polygon(3, cx, cy, r, theta), fill=255)
    elif shape == "hexagon":
        d.polygon(_polygon(6, cx, cy, r, theta), fill=255)
    elif shape == "star":
        d.polygon(_polygon(10, cx, cy, r, theta, [1.0, 0.45]), fill=255)
    elif shape == "cross":
        d.polygon(_cross(cx, cy, r, theta), fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = 0.55 * r
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = cx + 0.45 * r * math.cos(theta), cy + 0.45 * r * math.sin(theta)
        d.ellipse([ox - 0.8 * r, oy - 0.8 * r, ox + 0.8 * r, oy + 0.8 * r], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def _far_colour(rng: np.random.Generator, ref: np.ndarray, min_dist: float) -> np.ndarray:
    for _ in range(50):
        c = rng.uniform(0, 255, 3)
        if np.linalg.norm(c - ref) >= min_dist:
            return c
    return 255.0 - ref


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(4)
    base = rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:  # solid
        bg = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == 1:  # linear gradient
        other = rng.uniform(0, 255, 3)
        a = rng.uniform(0, 2 * math.pi)
        t = np.clip(0.5 + (xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a), 0, 1)[..., None]
        bg = base * (1 - t) + other * t
    elif kind == 2:  # noise
        bg = base + rng.normal(0, 30, (size, size, 3))
    else:  # soft blobs (distractors)
        bg = np.broadcast_to(base, (size, size, 3)).copy()
        for _ in range(rng.integers(2, 6)):
            c = rng.uniform(0, 255, 3)
            bx, by, br = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
            m = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * br**2))[..., None] * 0.6
            bg = bg * (1 - m) + c * m
    return bg


def _texture(texture: str, size: int, cx: float, cy: float, r: float, theta: float, rng: np.random.Generator):
    """(size, size) bool pattern in the object's rotated frame (False everywhere for 'solid')."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
    v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
    p = max(r * rng.uniform(0.35, 0.6), 2.0)
    if texture == "solid":
        return np.zeros((size, size), bool)
    if texture in _PERIODIC:
        return _periodic(texture, u, v, p)
    raise ValueError(f"unknown texture {texture!r}")


_PERIODIC = ("stripes", "checker", "dots")


def _periodic(kind: str, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """Stripes, checker or dots of period ``p`` in the rotated frame (u, v)."""
    if kind == "stripes":
        return np.floor(u / (p / 2)) % 2 == 1
    if kind == "checker":
        return (np.floor(u / (p / 2)) + np.floor(v / (p / 2))) % 2 == 1
    return ((u % p) - p / 2) ** 2 + ((v % p) - p / 2) ** 2 < (0.3 * p) ** 2


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool full-image pattern of class ``kind`` with a random orientation, period and phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    th = rng.uniform(0, 2 * math.pi)
    p = max(size * rng.uniform(0.09, 0.17), 2.0)
    cx, cy = rng.uniform(0, size, 2)
    u = (xx - cx) * math.cos(th) + (yy - cy) * math.sin(th)
    v = -(xx - cx) * math.sin(th) + (yy - cy) * math.cos(th)
    if kind in _PERIODIC:
        return _periodic(kind, u, v, p)
    if kind in ("grid", "hatch"):  # hatch: two line families 60 degrees apart
        a = th + (math.pi / 2 if kind == "grid" else math.pi / 3)
        u2 = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
        return (np.abs((u % p) - p / 2) < 0.12 * p) | (np.abs((u2 % p) - p / 2) < 0.12 * p)
    if kind == "rings":
        return np.floor(np.hypot(u, v) / (p / 2)) % 2 == 1
    if kind == "waves":
        return np.floor((u + 0.35 * p * np.sin(2 * math.pi * v / (1.5 * p))) / (p / 2)) % 2 == 1
    if kind == "zigzag":
        return np.floor((u + np.abs((v / p) % 2 - 1) * p * 0.8) / (p / 2)) % 2 == 1
    if kind == "blobs":  # thresholded smooth noise
        g = _smooth_field(rng, size, size // 8 + 2, 1)[..., 0]
        return g > np.median(g)
    if kind == "radial":
        n = int(rng.integers(6, 12))
        return np.floor((np.arctan2(v, u) + math.pi) / (math.pi / n)) % 2 == 1
    raise ValueError(f"unknown pattern {kind!r}")


def _smooth_field(rng: np.random.Generator, size: int, grid: int, channels: int) -> np.ndarray:
    """(size, size, channels) float field in [0, 255]: a grid x grid random lattice, bicubic-upsampled."""
    g = rng.uniform(0, 255, (grid, grid, channels)).astype(np.float32)
    up = [np.asarray(Image.fromarray(g[..., c], "F").resize((size, size), Image.BICUBIC)) for c in range(channels)]
    return np.clip(np.stack(up, -1), 0, 255)


def _render_texture(index: int, label: int, size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng([seed, index, label, 1])
    ink = _smooth_field(rng, size, 3, 3) * 0.5
    paper = ink + 128.0  # 128 apart in every channel, everywhere: the pattern is always visible
    if rng.random() < 0.5:
        ink, paper = paper, ink
    mask = _pattern(PATTERNS[label], size, rng)[..., None]
    img = np.where(mask, ink, paper) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def render_image(index: int, label: int, size: int = 96, seed: int = 0, kind: str = "textures") -> Image.Image:
    """The image number ``index`` (of class ``label``) of the dataset of ``kind`` with ``seed``."""
    _check_kind(kind)
    if not 0 <= label < MAX_CLASSES[kind]:
        raise ValueError(f"label must be in [0, {MAX_CLASSES[kind]}) for {kind}, got {label}")
    if kind == "textures":
        return _render_texture(index, label, size, seed)
    rng = np.random.default_rng([seed, index, label])
    shape, texture = _class_pair(label)
    bg = _background(rng, size)
    fg = _far_colour(rng, bg.reshape(-1, 3).mean(0), 90.0)
    fg2 = _far_colour(rng, fg, 70.0)
    r = size * rng.uniform(0.18, 0.38)
    cx, cy = rng.uniform(0.6 * r, size - 0.6 * r, 2)
    theta = rng.uniform(0, 2 * math.pi)
    alpha = _shape_mask(shape, size, cx, cy, r, theta)[..., None]
    pattern = _texture(texture, size, cx, cy, r, theta, rng)[..., None]
    obj = np.where(pattern, fg2, fg)
    img = bg * (1 - alpha) + obj * alpha
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def _meta(num_images: int, num_classes: int, image_size: int, seed: int, val_fraction: float, kind: str) -> dict:
    return {"format": "esvit-synthetic", "version": FORMAT_VERSION, "kind": kind, "num_images": num_images,
            "num_classes": num_classes, "image_size": image_size, "seed": seed, "val_fraction": val_fraction,
            "classes": class_names(num_classes, kind)}


def _check_args(num_images: int, num_classes: int, image_size: int, val_fraction: float, kind: str) -> None:
    _check_kind(kind)
    if not 1 <= num_classes <= MAX_CLASSES[kind]:
        what = "10 patterns" if kind == "textures" else "8 shapes x 4 textures"
        raise DataError(f"--num-classes must be between 1 and {MAX_CLASSES[kind]} for {kind} ({what}), "
                        f"got {num_classes}")
    if num_images < num_classes:
        raise DataError(f"--num-images ({num_images}) must be at least --num-classes ({num_classes})")
    if image_size < 16:
        raise DataError(f"--image-size must be >= 16 px, got {image_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")


def _write(root: Path, num_images: int, num_classes: int, image_size: int, seed: int, val_fraction: float,
           kind: str, progress: bool) -> dict:
    names = class_names(num_classes, kind)
    per_class: dict[int, list[int]] = {c: list(range(c, num_images, num_classes)) for c in range(num_classes)}
    counts = {"train": 0, "val": 0}
    items = []
    for c, idxs in per_class.items():
        n_val = int(round(val_fraction * len(idxs)))
        for j, i in enumerate(idxs):
            items.append((i, c, "val" if j >= len(idxs) - n_val else "train"))
    items.sort()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="generating images", unit="img")
    for i, c, split in items:
        d = root / split / names[c]
        d.mkdir(parents=True, exist_ok=True)
        render_image(i, c, image_size, seed, kind).save(d / f"{names[c]}_{i:06d}.png")
        counts[split] += 1
    meta = _meta(num_images, num_classes, image_size, seed, val_fraction, kind) | {"counts": counts}
    with open(root / META_FILE, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return meta


def make_dataset(
    root: str | os.PathLike, num_images: int, num_classes: int, *, val_fraction: float = 0.0, image_size: int = 96,
    seed: int = 0, kind: str = "textures", progress: bool = False,
) -> dict:
    """Write the dataset of ``kind`` into ``root`` (must be absent or empty; re-running with the same
    arguments on a complete dataset is a no-op). Returns its metadata."""
    _check_args(num_images, num_classes, image_size, val_fraction, kind)
    root = Path(root)
    meta_path = root / META_FILE
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        want = _meta(num_images, num_classes, image_size, seed, val_fraction, kind)
        if all(old.get(k) == v for k, v in want.items()):
            return old
        raise DataError(f"{root} already holds a generated dataset with other arguments; choose another directory")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} exists and is not an empty directory; choose a new directory")
    root.mkdir(parents=True, exist_ok=True)
    return _write(root, num_images, num_classes, image_size, seed, val_fraction, kind, progress)


def ensure_embedded(cache_dir: str | os.PathLike, num_images: int, num_classes: int, image_size: int,
                    seed: int = 0, progress: bool = False, kind: str = "textures") -> Path:
    """The embedded dataset's directory under ``cache_dir``, generated on first use.

    Generated into a private temporary directory and renamed into place, so no process ever sees a
    half-written dataset. A generator holds an exclusive lock on ``cache_dir`` (``flock``; the kernel
    drops it when the process dies): a concurrent caller waits, then uses the dataset it finds, and the
    lock holder deletes the temporary directories it finds -- no live generator can own them, so they
    are left by killed ones.
    """
    _check_args(num_images, num_classes, image_size, 0.0, kind)
    cache = Path(cache_dir)
    final = cache / f"embedded-v{FORMAT_VERSION}-{kind}-n{num_images}-c{num_classes}-s{image_size}-seed{seed}"
    if (final / META_FILE).exists():
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache, os.O_RDONLY)
    except OSError as exc:
        raise _unwritable(cache, exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another process generates a dataset here
            locked = True
        except OSError:  # a filesystem without directory locks: other processes' temp directories are kept
            locked = False
        if (final / META_FILE).exists():
            return final
        if locked:
            for stale in cache.glob(".embedded-*.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = cache / f".{final.name}.tmp-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as exc:
            raise _unwritable(cache, exc) from exc
        _write(tmp, num_images, num_classes, image_size, seed, 0.0, kind, progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META_FILE).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        os.close(fd)
    return final


def _unwritable(cache: Path, exc: OSError) -> DataError:
    return DataError(f"cannot create the embedded dataset under {cache} ({exc}); set data.cache_dir or $ESVIT_CACHE "
                     "to a writable directory")
