"""Decode every training image once, before training, and remember the verdict.

The folder scan reads headers only; a truncated or corrupt file can have a fine
header and fail half-way through decoding, minutes into a run. Here each image is
fully decoded (JPEGs at reduced DCT scale, which still reads the whole stream).
Verdicts are cached by (path, modification time, size), so the GUI's check on
every edit only decodes new or changed files, within a time budget.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# path, mtime_ns, size -> None (decodes fine) or the reason it does not
_verdicts: dict[tuple[str, int, int], str | None] = {}
_CACHE_LIMIT = 200_000
_CHUNK = 32  # images decoded between two looks at the clock


@dataclass(frozen=True)
class Verification:
    bad: dict[Path, str]  # file -> why it cannot be decoded
    unverified: int  # not decoded within the time budget


def decode_problem(path: Path) -> str | None:
    """None when the image decodes completely, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Image.DecompressionBombError as exc:
        return f"too large to decode safely: {exc}"
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
    bad: dict[Path, str] = {}
    pending: list[tuple[Path, tuple[str, int, int]]] = []
    for path in paths:
        key = _cache_key(path)
        if key is None:
            bad[path] = "cannot be read (it was moved or deleted?)"
        elif key in _verdicts:
            if _verdicts[key] is not None:
                bad[path] = _verdicts[key]
        else:
            pending.append((path, key))
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
    return Verification(bad, len(pending) - done)


def _remember(key: tuple[str, int, int], verdict: str | None) -> None:
    if len(_verdicts) >= _CACHE_LIMIT:
        _verdicts.clear()
    _verdicts[key] = verdict


def clear_cache() -> None:
    _verdicts.clear()
