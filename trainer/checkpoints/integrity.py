"""Is a weights file whole, and loadable without running code? Read only as far as that takes.

A ``.safetensors`` file is checked from its header: the 8-byte length, the JSON, and the
largest data offset against the file size (a cut download fails here, before any model
loads). A pickle (``.ckpt``/``.pt``/``.bin``) is opened with torch's weights-only loader,
memory-mapped, so its tensors are not read. No torch import for ``.safetensors``.
Every torch-free reader of a header (detection, the size estimate, the LoRA check) goes through
:func:`read_safetensors_header`, so one check parses each file once.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from trainer.checkpoints.reader import PICKLE_SUFFIXES

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
FIX = "copy or download the file again; a .safetensors version is safest"
NOT_SAFETENSORS = "the header length is impossible: the file is not .safetensors, or it is truncated"


@dataclass(frozen=True)
class SafetensorsHeader:
    """A .safetensors file's header: each tensor's entry (dtype, shape, data_offsets), the
    ``__metadata__`` strings, and the bytes the header takes (8-byte length + JSON). Shared by every
    reader of the file through the cache: read it, never change it."""

    tensors: Mapping[str, dict]
    metadata: Mapping[str, str]
    header_bytes: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor. Raises KeyError or TypeError for a malformed entry."""
        return {key: tuple(entry["shape"]) for key, entry in self.tensors.items()}

    @property
    def data_end(self) -> int:
        """Where the last tensor's data ends, counted from the end of the header."""
        return max((int(entry["data_offsets"][1]) for entry in self.tensors.values() if isinstance(entry, dict)),
                   default=0)


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The header of a .safetensors file, read once per (path, size, modification time): the model check,
    the size estimate and the LoRA check ask for the same file. Raises ValueError or OSError."""
    stat = os.stat(path)
    return _read_header(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)  # thread-safe; keyed by size and mtime, so a changed file is read again
def _read_header(path: str, size: int, mtime_ns: int) -> SafetensorsHeader:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("the file is too short to be a .safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(NOT_SAFETENSORS)
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a table of tensors: the file is not .safetensors")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError("the header's __metadata__ is not a table of strings: the file is not .safetensors")
    return SafetensorsHeader(MappingProxyType(header), MappingProxyType(metadata), 8 + length)


def safetensors_problem(path: Path) -> str | None:
    """Why the .safetensors file cannot be loaded (damaged, truncated), or None."""
    try:
        header = read_safetensors_header(path)
        needed, size = header.header_bytes + header.data_end, os.path.getsize(path)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        return f"is not a readable .safetensors file ({exc})"
    if size < needed:
        return (f"is truncated: it has {size:,} bytes but its header describes {needed:,} "
                "(an interrupted download or copy)")
    return None


def pickle_problem(path: Path) -> str | None:
    """Why torch's weights-only loader cannot open the pickle (needs code to run, damaged), or None."""
    from trainer.checkpoints.errors import CheckpointError
    from trainer.checkpoints.reader import load_weights_only

    try:
        load_weights_only(path)
    except CheckpointError as exc:
        return str(exc).removeprefix(f"{path.name} ")
    return None


def weights_file_problem(path: Path, *, deep: bool = True) -> str | None:
    """The problem of one weights file; pickles are opened only when ``deep`` (that imports torch)."""
    if not path.exists():  # a shard a folder's index names, or a file gone since
        return "does not exist"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return safetensors_problem(path)
    if suffix in PICKLE_SUFFIXES and deep:
        return pickle_problem(path)
    return None


def unreadable_weights(files: list[Path], exc: BaseException) -> str:
    """The user's message for a library error while loading ``files``: the damaged file and why, in our words."""
    for file in files:
        problem = weights_file_problem(Path(file))
        if problem:
            return f"{file} {problem}"
    names = ", ".join(str(f) for f in files)
    return f"{names} could not be loaded ({type(exc).__name__}); the file may be damaged: {FIX}"
