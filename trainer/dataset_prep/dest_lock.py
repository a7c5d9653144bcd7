"""One dataset preparation at a time per destination: a lock file naming the process that writes there.

Without it, a second preparation into the same folder would take the first one's staging
folder for a crashed run's leftover and delete it mid-copy. A lock whose process is gone
(a crash, a killed GUI) is stale and taken over.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

from trainer.safety import pid_alive

from .layout import DatasetPrepError

LOCK_NAME = ".nekoya-prepare.lock"
# The GUI prepares in worker threads of one process, so the pid alone does not tell two of them apart.
_held_here: set[Path] = set()
_held_here_guard = threading.Lock()


@contextmanager
def destination_lock(dest: Path):
    """Hold ``dest``'s lock while the body runs; DatasetPrepError when a live process holds it."""
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    lock = dest.resolve() / LOCK_NAME
    _acquire(lock)
    try:
        yield
    finally:
        _release(lock)
        if created and not any(dest.iterdir()):  # refused before anything was written: leave no empty folder
            dest.rmdir()


def _acquire(lock: Path) -> None:
    with _held_here_guard:
        if lock in _held_here:
            raise DatasetPrepError(_busy(lock, os.getpid()))
        for _ in range(2):  # a second try after removing a stale lock
            if _create(lock):
                _held_here.add(lock)
                return
            holder = _holder(lock)
            if holder is not None:
                raise DatasetPrepError(_busy(lock, holder))
            lock.unlink(missing_ok=True)
    raise DatasetPrepError(f"cannot lock {lock.parent} for copying; try again")


def _create(lock: Path) -> bool:
    """Create ``lock`` holding this pid, whole or not at all (a hard link of a written file); False if it exists."""
    written = lock.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
    written.write_text(str(os.getpid()))
    try:
        os.link(written, lock)
        return True
    except FileExistsError:
        return False
    finally:
        written.unlink(missing_ok=True)


def _busy(lock: Path, pid: int) -> str:
    return (f"another dataset preparation (process {pid}) is copying into {lock.parent} right now; "
            "wait until it has finished, or choose another destination")


def _holder(lock: Path) -> int | None:
    """The live process holding ``lock``, or None when the lock is stale (its process is gone)."""
    try:
        pid = int(lock.read_text().strip())
    except (OSError, ValueError):
        return None  # unreadable or half-written by a process that died at once
    return pid if pid != os.getpid() and pid_alive(pid) else None  # this process's threads: _held_here


def _release(lock: Path) -> None:
    with _held_here_guard:
        _held_here.discard(lock)
    try:
        if lock.read_text().strip() == str(os.getpid()):
            lock.unlink()
    except OSError:
        pass
