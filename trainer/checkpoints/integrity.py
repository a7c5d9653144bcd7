"""Is a weights file whole, and loadable without running code? Read only as far as that takes.

A ``.safetensors`` file is checked from its header: the 8-byte length, the JSON, and the
largest data offset against the file size (a cut download fails here, before any model
loads). A pickle (``.ckpt``/``.pt``/``.bin``) is opened with torch's weights-only loader,
memory-mapped, so its tensors are not read. No torch import for ``.safetensors``.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from trainer.checkpoints.reader import PICKLE_SUFFIXES

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
FIX = "copy or download the file again; a .safetensors version is safest"
NOT_SAFETENSORS = "the header length is impossible: the file is not .safetensors, or it is truncated"


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (``__metadata__`` included). Raises ValueError or OSError."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("the file is too short to be a .safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_SAFETENSORS_HEADER, os.path.getsize(path) - 8):
            raise ValueError(NOT_SAFETENSORS)
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a table of tensors: the file is not .safetensors")
    header["__header_bytes__"] = 8 + length
    return header


def safetensors_problem(path: Path) -> str | None:
    """Why the .safetensors file cannot be loaded (damaged, truncated), or None."""
    try:
        header = read_safetensors_header(path)
        data_end = max((int(entry["data_offsets"][1]) for key, entry in header.items()
                        if isinstance(entry, dict) and key != "__metadata__"), default=0)
        needed, size = header["__header_bytes__"] + data_end, os.path.getsize(path)
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
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return safetensors_problem(path)
    if suffix in PICKLE_SUFFIXES and deep:
        return pickle_problem(path)
    return None


def folder_weight_files(folder: Path) -> list[Path]:
    """The weights files a diffusers folder's components load: .safetensors, else its pickles."""
    files = []
    for component in sorted(p for p in folder.iterdir() if (p / "config.json").is_file()):
        safetensors = sorted(component.glob("*.safetensors"))
        files += safetensors or sorted(p for p in component.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    return files



def unreadable_weights(files: list[Path], exc: BaseException) -> str:
    """The user's message for a library error while loading ``files``: the damaged file and why, in our words."""
    for file in files:
        problem = weights_file_problem(Path(file))
        if problem:
            return f"{file} {problem}"
    names = ", ".join(str(f) for f in files)
    return f"{names} could not be loaded ({type(exc).__name__}); the file may be damaged: {FIX}"
