"""Generated dataset, multi-crop augmentation, image folders, sampler and their error handling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from esvit.data import (
    GlobalBatchSampler,
    ImageDataset,
    MultiCropAugmentation,
    collate_crops,
    ensure_embedded,
    make_dataset,
    render_image,
    scan_image_folder,
)
from esvit.data.synthetic import max_classes
from esvit.errors import DataError


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_dataset_deterministic_labelled_split(tmp_path):
    meta = make_dataset(tmp_path / "a", 60, 6, val_fraction=0.2, image_size=32, seed=3)
    make_dataset(tmp_path / "b", 60, 6, val_fraction=0.2, image_size=32, seed=3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert meta["counts"] == {"train": 48, "val": 12}
    classes = sorted(p.name for p in (tmp_path / "a" / "train").iterdir())
    assert classes == meta["classes"] and len(classes) == 6
    assert all(len(list((tmp_path / "a" / "val" / c).iterdir())) == 2 for c in classes)
    assert json.loads((tmp_path / "a" / "esvit_dataset.json").read_text())["num_images"] == 60
    # the same arguments again: a no-op; other arguments into a used directory: an error
    assert make_dataset(tmp_path / "a", 60, 6, val_fraction=0.2, image_size=32, seed=3)["num_classes"] == 6
    with pytest.raises(DataError, match="other arguments"):
        make_dataset(tmp_path / "a", 60, 5, image_size=32)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="not an empty directory"):
        make_dataset(tmp_path / "c", 10, 2)
    with pytest.raises(DataError, match="between 1 and 10 for textures"):
        make_dataset(tmp_path / "d", 100, 11)
    with pytest.raises(DataError, match="between 1 and 32 for shapes"):
        make_dataset(tmp_path / "d", 100, 33, kind="shapes")
    with pytest.raises(DataError, match="unknown dataset kind"):
        make_dataset(tmp_path / "d", 100, 3, kind="faces")
    # the kind is part of the identity of a generated directory
    with pytest.raises(DataError, match="other arguments"):
        make_dataset(tmp_path / "a", 60, 6, val_fraction=0.2, image_size=32, seed=3, kind="shapes")
    # a generated root means its train split
    samples, names = scan_image_folder(tmp_path / "a")
    assert len(samples) == 48 and names == classes


@pytest.mark.parametrize("kind", ["textures", "shapes"])
def test_generated_images_are_varied(kind):
    imgs = [np.asarray(render_image(i, i % 8, 48, kind=kind), dtype=np.float32) for i in range(16)]
    assert all(im.shape == (48, 48, 3) and im.std() > 10 for im in imgs)  # not flat
    # two images of one class differ (colour, position, scale / orientation, background vary)
    assert np.abs(imgs[0] - imgs[8]).mean() > 10
    assert np.array_equal(np.asarray(render_image(5, 3, 48, kind=kind)), np.asarray(render_image(5, 3, 48, kind=kind)))
    with pytest.raises(ValueError, match="label must be in"):
        render_image(0, max_classes(kind), 48, kind=kind)


def test_texture_colours_vary_across_the_image():
    """The textures' colour fields differ between the halves of an image (no crop shares another's colours),
    and ink and paper stay 128 apart (up to the noise), so the pattern is visible everywhere."""
    im = np.asarray(render_image(3, 0, 96), dtype=np.float32)
    left, right = im[:, :32].reshape(-1, 3), im[:, 64:].reshape(-1, 3)
    assert np.abs(np.median(left, 0) - np.median(right, 0)).max() > 10
    gray = im.mean(-1)
    assert np.percentile(gray, 90) - np.percentile(gray, 10) > 90


def test_augmentation_blur_and_solarize_switch_off():
    img = render_image(0, 2, 64)
    torch.manual_seed(0)
    plain = MultiCropAugmentation(64, 32, (1.0, 1.0), (0.3, 0.3), local_number=0, blur=False, solarize=False)
    blurred = MultiCropAugmentation(64, 32, (1.0, 1.0), (0.3, 0.3), local_number=0)
    assert plain.global_1.transforms[2].p == 0.0 and plain.global_2.transforms[3].p == 0.0
    assert blurred.global_1.transforms[2].p == 1.0 and blurred.global_2.transforms[3].p == 0.2
    # without blur the first global crop keeps the pattern's edges (higher gradient energy)
    def edges(aug):
        torch.manual_seed(1)
        x = aug(img)[0]
        return (x[:, 1:] - x[:, :-1]).abs().mean().item()
    assert edges(plain) > 1.2 * edges(blurred)


def test_multicrop_augmentation_shapes():
    aug = MultiCropAugmentation(64, 32, local_number=3)
    torch.manual_seed(0)
    crops = aug(render_image(0, 0, 96))
    assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    assert aug.num_crops == 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, 24, 3, image_size=48)
    return root


def test_samples_are_a_function_of_seed_epoch_index(folder):
    ds = ImageDataset(folder, MultiCropAugmentation(32, 16, local_number=2), seed=7)
    before = torch.get_rng_state()
    a, b = ds[3], ds[3]
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"]))
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["crops"][0], a["crops"][0])
    # worker processes produce the very same batches
    ds.set_epoch(0)
    sampler = GlobalBatchSampler(len(ds), 4, seed=1)
    batches = [[c.clone() for c in b.crops] for b in DataLoader(ds, 4, sampler=sampler, collate_fn=collate_crops)]
    with_workers = list(DataLoader(ds, 4, sampler=sampler, collate_fn=collate_crops, num_workers=2))
    assert len(batches) == len(with_workers) == 6
    for x, y in zip(batches, with_workers):
        assert all(torch.equal(p, q) for p, q in zip(x, y.crops))


def test_sampler_global_batches_do_not_depend_on_world_size():
    one = GlobalBatchSampler(50, 8, seed=3)
    two = [GlobalBatchSampler(50, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(2)
    assert one.steps_per_epoch == two[0].steps_per_epoch == 6
    a, r0, r1 = list(one), list(two[0]), list(two[1])
    for k in range(6):
        assert a[8 * k:8 * k + 8] == r0[4 * k:4 * k + 4] + r1[4 * k:4 * k + 4]
    one.set_epoch(2, start_step=4)
    assert list(one) == a[32:] and len(one) == 16


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        scan_image_folder(tmp_path / "file")
    flat = tmp_path / "flat"
    flat.mkdir()
    render_image(0, 0, 32).save(flat / "a.png")
    (flat / "b.png").write_bytes(b"not a png at all")
    samples, classes = scan_image_folder(flat)
    assert [Path(p).name for p, _ in samples] == ["a.png", "b.png"] and classes == ["flat"]
    ds = ImageDataset(flat, MultiCropAugmentation(32, 16, local_number=1))
    bad = ds[1]
    assert "error" in bad and "b.png" in bad["error"]
    batch = collate_crops([ds[0], bad])
    assert batch.crops == [] and len(batch.errors) == 1


def test_ensure_embedded_once(tmp_path):
    a = ensure_embedded(tmp_path, 20, 4, 32)
    stamp = (a / "esvit_dataset.json").stat().st_mtime_ns
    assert ensure_embedded(tmp_path, 20, 4, 32) == a
    assert (a / "esvit_dataset.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [a.name]  # no temp directory left
    assert len(scan_image_folder(a)[0]) == 20


# --------------------------------------------------------------------------- image modes -> 8-bit RGB

GRADIENT16 = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)  # every 16-bit level band, 0 .. 65520


def _mode_cases(d: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """image files of many PIL modes and the 8-bit RGB each must become."""
    from PIL import Image

    g8 = (GRADIENT16 >> 8).astype(np.uint8)
    grey = np.repeat(g8[..., None], 3, axis=2)
    cases = {}

    def add(name: str, img: Image.Image, expected: np.ndarray, ext: str = "png") -> None:
        path = d / f"{name}.{ext}"
        img.save(path)
        cases[name] = (path, expected)

    add("I;16 png", Image.fromarray(GRADIENT16), grey)
    add("I;16B tiff", Image.frombytes("I;16B", (64, 64), GRADIENT16.astype(">u2").tobytes()), grey, "tif")
    add("I;16 tiff", Image.fromarray(GRADIENT16), grey, "tif")
    add("I 16-bit pgm", Image.fromarray(GRADIENT16), grey, "pgm")
    add("I 32-bit tiff", Image.fromarray(GRADIENT16.astype(np.int32) << 15, "I"), grey, "tif")  # signed: 31 bits
    add("L", Image.fromarray(g8), grey)
    bits = (g8 >= 128)
    add("1", Image.fromarray(g8).point(lambda v: 255 if v >= 128 else 0).convert("1"),
        np.repeat((bits * 255).astype(np.uint8)[..., None], 3, axis=2))
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12)
    idx = (np.arange(64 * 64).reshape(64, 64) % 4).astype(np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette)
    add("P", p, np.array(palette[:12], dtype=np.uint8).reshape(4, 3)[idx])
    add("LA", Image.fromarray(np.stack([g8, 255 - g8], -1), "LA"), grey)
    add("RGBA", Image.fromarray(np.concatenate([grey, g8[..., None]], -1), "RGBA"), grey)
    add("CMYK", Image.fromarray(np.stack([255 - g8, 255 - g8, 255 - g8, 0 * g8], -1), "CMYK"), grey, "tif")
    return cases


def test_every_image_mode_becomes_the_right_8bit_rgb(tmp_path):
    """16- and 32-bit greyscale used to come out white (convert("RGB") clips at 255); now value >> (bits - 8)."""
    from esvit.data.datasets import load_rgb

    for name, (path, expected) in _mode_cases(tmp_path).items():
        img = load_rgb(path)
        assert img.mode == "RGB", name
        np.testing.assert_array_equal(np.asarray(img), expected, err_msg=name)


def test_images_without_a_defined_8bit_rendering_are_refused(tmp_path):
    from PIL import Image

    from esvit.data.datasets import load_rgb

    Image.fromarray(GRADIENT16.astype(np.float32) / 65535, "F").save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"cannot read image .*f\.tif: 32-bit floating-point .* 8- or 16-bit"):
        load_rgb(tmp_path / "f.tif")
    Image.fromarray(GRADIENT16.astype(np.int32) - 3, "I").save(tmp_path / "neg.tif")
    with pytest.raises(DataError, match=r"neg\.tif: greyscale pixels .* \[-3, .*outside"):
        load_rgb(tmp_path / "neg.tif")
    with pytest.raises(DataError, match="no such image"):
        load_rgb(tmp_path / "missing.png")


def test_pretraining_evaluation_and_pictures_read_16bit_images_right(tmp_path):
    """The same picture as a 16-bit and as an 8-bit PNG gives the same tensors everywhere images are read."""
    from PIL import Image

    from esvit.eval.data import EvalImageFolder
    from esvit.eval.transforms import eval_transform
    from esvit.viz.common import load_image

    for depth, arr in (("16", GRADIENT16), ("8", (GRADIENT16 >> 8).astype(np.uint8))):
        (tmp_path / depth / "cls").mkdir(parents=True)
        Image.fromarray(arr).save(tmp_path / depth / "cls" / "img.png")
    aug = MultiCropAugmentation(32, 16, local_number=1)
    a, b = (ImageDataset(tmp_path / d, aug)[0]["crops"] for d in ("16", "8"))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    a, b = (EvalImageFolder(tmp_path / d, eval_transform(32))[0]["image"] for d in ("16", "8"))
    assert torch.equal(a, b) and a.std() > 0.5  # a gradient, not a white page
    a, b = (load_image(tmp_path / d / "cls" / "img.png", 32) for d in ("16", "8"))
    assert torch.equal(a, b)


def test_a_refused_image_is_a_clear_error_in_every_reader(tmp_path):
    from PIL import Image

    from esvit.eval.data import EvalImageFolder
    from esvit.eval.transforms import eval_transform
    from esvit.viz.common import load_image

    (tmp_path / "cls").mkdir()
    path = tmp_path / "cls" / "f.tif"
    Image.fromarray(np.ones((8, 8), np.float32), "F").save(path)
    assert "floating-point" in ImageDataset(tmp_path, MultiCropAugmentation(32, 16, local_number=1))[0]["error"]
    assert "floating-point" in EvalImageFolder(tmp_path, eval_transform(32))[0]["error"]
    with pytest.raises(DataError, match="floating-point"):
        load_image(path, 32)
