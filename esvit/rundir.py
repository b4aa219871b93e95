"""The output directory of a pretraining run: one run at a time (a lock), and ``log.jsonl`` kept in step with
``checkpoint.pth``.

* :func:`lock_output` takes an exclusive ``flock`` on ``OUTPUT/.esvit.lock`` for the whole run and writes the
  holder (pid, host, start time) into it. A second run on the same directory is refused with that holder;
  the kernel drops the lock when its process dies (even by SIGKILL), so a stale lock file never blocks.
* The log is the checkpoint's list of epoch records (``state["log"]``) written as JSON lines. At the end
  of an epoch the log (with the new line) is replaced atomically *before* the checkpoint, so a kill at any
  point leaves every epoch of the checkpoint in the log; on resume the log is rewritten from the
  checkpoint, which drops the line of an epoch that is about to be redone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .checkpoint import atomic_write
from .errors import ConfigError

__all__ = ["LOCK_NAME", "OutputLock", "lock_output", "move_aside", "read_log", "write_log"]

LOCK_NAME = ".esvit.lock"


class OutputLock:
    """The held lock of an output directory; :meth:`release` (or the process's death) frees it."""

    def __init__(self, fd: int | None, path: Path) -> None:
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _check_writable(out: Path) -> None:
    probe = out / f".write-test.tmp-{os.getpid()}"  # a leftover is a stale temp file: removed at the next start
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write to the output directory {out} ({exc.strerror or exc}); pass a writable "
                          "--output") from None


def lock_output(out: str | os.PathLike) -> tuple[OutputLock, str | None]:
    """Check that ``out`` (an existing directory) is writable and lock it for this process.

    Returns the lock and a warning (or None): on a filesystem without ``flock`` the run goes on unlocked.
    Raises :class:`ConfigError` when the directory cannot be written or another live process holds it.
    """
    out = Path(out)
    _check_writable(out)
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write to the output directory {out} ({exc.strerror or exc}); pass a writable "
                          "--output") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            return OutputLock(None, path), (f"cannot lock {path} ({exc.strerror}): a second run on {out} would not "
                                            "be noticed")
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "it has not written its details yet"
        os.close(fd)
        raise ConfigError(f"{out} is in use by another esvit pretrain ({holder}); wait for it to finish or stop "
                          "it, or pass another --output") from None
    info = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode() + b"\n", 0)
    return OutputLock(fd, path), None


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``log.jsonl`` ([] when absent); a torn last line (an old append cut short) is skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_log(path: str | os.PathLike, records: list[dict]) -> None:
    """Replace ``path`` atomically by one JSON line per record."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode()))


def move_aside(path: str | os.PathLike) -> Path:
    """Rename ``path`` to the first free ``path.1``, ``path.2``, ...; returns the new name."""
    path = Path(path)
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    new = path.with_name(f"{path.name}.{n}")
    os.replace(path, new)
    return new
