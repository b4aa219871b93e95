"""The embedded dataset's cache: killed generations leave no temporary directory behind for good, and a
generation in progress is neither disturbed nor duplicated."""

from __future__ import annotations

import fcntl
import os
import threading
import time

from esvit.data import ensure_embedded, make_dataset

ARGS = (8, 2, 16)  # images, classes, size: a dataset of a few milliseconds
NAME = "embedded-v2-textures-n8-c2-s16-seed0"


def _temp_dir(cache, name: str, pid: int):
    tmp = cache / f".{name}.tmp-{pid}"
    (tmp / "train").mkdir(parents=True)
    (tmp / "train" / "half.png").write_bytes(b"half an image")
    return tmp


def test_killed_generations_are_cleaned_up(tmp_path):
    mine = _temp_dir(tmp_path, NAME, 999_999_991)  # a killed generation of this dataset
    other = _temp_dir(tmp_path, "embedded-v2-textures-n40-c4-s32-seed0", 999_999_992)  # ... of another one
    root = ensure_embedded(tmp_path, *ARGS)
    assert root == tmp_path / NAME and len(list((root / "train").rglob("*.png"))) == 8
    assert not mine.exists() and not other.exists()
    assert [p.name for p in tmp_path.iterdir()] == [NAME]


def test_a_concurrent_caller_waits_for_the_generator(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a generator is at work in this cache
    working = _temp_dir(tmp_path, NAME, 999_999_994)
    result = {}
    waiter = threading.Thread(target=lambda: result.update(root=ensure_embedded(tmp_path, *ARGS)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and (working / "train" / "half.png").exists()  # waits, and leaves its work alone
    make_dataset(tmp_path / NAME, *ARGS[:2], image_size=ARGS[2])  # the generator finishes ...
    meta = (tmp_path / NAME / "esvit_dataset.json").stat().st_mtime_ns
    os.close(fd)  # ... and lets go
    waiter.join(30)
    assert result["root"] == tmp_path / NAME
    assert (tmp_path / NAME / "esvit_dataset.json").stat().st_mtime_ns == meta  # used as is, not regenerated
