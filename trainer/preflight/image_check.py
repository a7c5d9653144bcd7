"""Decode every training image once, before training, and remember the verdict.

The folder scan reads headers only; a truncated or corrupt file can have a fine
header and fail half-way through decoding, minutes into a run. Here each image is
fully decoded (JPEGs at reduced DCT scale, which still reads the whole stream;
PNGs by checking every chunk's CRC, which catches truncation and bit rot).
Verdicts are cached by (path, modification time, size), in memory and in
Nekoya's cache folder, so the GUI's check on every edit and the next CLI check
only decode new or changed files (the GUI's within a time budget).
"""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# path, mtime_ns, size -> None (decodes fine) or the reason it does not
_verdicts: dict[tuple[str, int, int], str | None] = {}
# The GUI's checks (two at once) and the training thread's deep check share the table: every access holds it.
_lock = threading.Lock()
_UNKNOWN = object()
_CACHE_LIMIT = 200_000
_CHUNK = 32  # images decoded between two looks at the clock
_CACHE_FILE_VERSION = 1
_disk_loaded = False


@dataclass(frozen=True)
class Verification:
    bad: dict[Path, str]  # file -> why it cannot be decoded
    unverified: int  # not decoded within the time budget


# Formats whose every chunk carries a CRC: verify() reads the whole file and checks them
# without inflating the pixels (a few ms instead of ~70 ms for a 1024 px PNG).
_CHECKSUMMED_FORMATS = {"PNG"}


def decode_problem(path: Path) -> str | None:
    """None when the image decodes completely (or all its checksums match), else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format in _CHECKSUMMED_FORMATS:
                image.verify()
                return None
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Image.DecompressionBombError:
        from trainer.data.images import too_large_reason

        return too_large_reason(path)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return f"cannot be decoded: {exc}"
    return None


def _cache_key(path: Path) -> tuple[str, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path), stat.st_mtime_ns, stat.st_size


def verify_images(paths: Iterable[Path], budget_s: float | None = None) -> Verification:
    """Decode each image not already verified; stop starting new ones after ``budget_s`` seconds."""
    _load_disk_cache()
    bad: dict[Path, str] = {}
    pending: list[tuple[Path, tuple[str, int, int]]] = []
    keyed = [(path, _cache_key(path)) for path in paths]
    with _lock:
        known = [(path, key, _UNKNOWN if key is None else _verdicts.get(key, _UNKNOWN)) for path, key in keyed]
    for path, key, verdict in known:
        if key is None:
            bad[path] = "cannot be read (it was moved or deleted?)"
        elif verdict is _UNKNOWN:
            pending.append((path, key))
        elif verdict is not None:
            bad[path] = verdict
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    done = 0
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        while done < len(pending) and (deadline is None or time.perf_counter() < deadline):
            chunk = pending[done : done + _CHUNK]
            for (path, key), verdict in zip(chunk, pool.map(decode_problem, [p for p, _ in chunk])):
                _remember(key, verdict)
                if verdict is not None:
                    bad[path] = verdict
            done += len(chunk)
    if done:
        _save_disk_cache()
    return Verification(bad, len(pending) - done)


def _remember(key: tuple[str, int, int], verdict: str | None) -> None:
    with _lock:
        if len(_verdicts) >= _CACHE_LIMIT:
            _verdicts.clear()
        _verdicts[key] = verdict


def clear_cache(*, disk: bool = False) -> None:
    """Forget the verdicts in memory (and, with ``disk``, the saved ones)."""
    global _disk_loaded
    with _lock:
        _verdicts.clear()
        _disk_loaded = not disk
    if disk:
        try:
            _cache_file().unlink()
        except OSError:
            pass


def _cache_file() -> Path:
    from trainer.checkpoints.shipped import cache_root

    return cache_root() / "preflight" / "image_verdicts.json"


def _load_disk_cache() -> None:
    global _disk_loaded
    with _lock:  # held while reading: a second check waits for the table rather than decoding everything again
        if _disk_loaded:
            return
        _disk_loaded = True
        try:
            data = json.loads(_cache_file().read_text(encoding="utf-8"))
            if data.get("version") == _CACHE_FILE_VERSION:
                for path, mtime_ns, size, verdict in data["verdicts"]:
                    _verdicts.setdefault((path, mtime_ns, size), verdict)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache yet, or an unreadable one: decode again


def _save_disk_cache() -> None:
    from trainer.safety import SaveError, atomic_write_text

    with _lock:
        rows = [[*key, verdict] for key, verdict in _verdicts.items()]
    try:
        atomic_write_text(_cache_file(), json.dumps({"version": _CACHE_FILE_VERSION, "verdicts": rows}))
    except SaveError:
        pass  # a read-only cache folder only costs speed
