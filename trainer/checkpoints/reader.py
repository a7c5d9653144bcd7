"""Read tensors from single-file checkpoints without loading more than needed.

``.safetensors``: only the header is parsed for keys and shapes; each tensor is
read on demand. ``.ckpt``/``.pt``: ``torch.load(..., weights_only=True)``
(memory-mapped when the file is in zip format); a pickle that needs arbitrary
code is refused with :class:`UnsafeCheckpointError`.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from trainer.checkpoints.errors import CheckpointError, UnsafeCheckpointError

SAFETENSORS_SUFFIXES = {".safetensors"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


class TensorSource:
    """Keys, shapes and tensors of one checkpoint file. Use as a context manager."""

    def __init__(self, path):
        self.path = Path(path)
        self.format = checkpoint_format(self.path)
        self.metadata: dict[str, str] = {}
        self._handle = None
        self._tensors: dict | None = None
        if self.format == "safetensors":
            self._open_safetensors()
        else:
            self._tensors = load_pickle_state_dict(self.path)

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            from trainer.checkpoints.integrity import unreadable_weights

            raise CheckpointError(unreadable_weights([self.path], exc)) from exc
        self.metadata = self._handle.metadata() or {}

    def keys(self) -> list[str]:
        return list(self._handle.keys()) if self._handle is not None else list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._handle is not None:
            return tuple(self._handle.get_slice(key).get_shape())
        return tuple(self._tensors[key].shape)

    def get(self, key: str):
        return self._handle.get_tensor(key) if self._handle is not None else self._tensors[key]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: self.shape(key) for key in self.keys()}

    def close(self) -> None:
        self._handle = None
        self._tensors = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def checkpoint_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "ckpt"
    raise CheckpointError(
        f"{Path(path).name}: unsupported file type {suffix!r}; expected .safetensors (recommended) or .ckpt"
    )


def load_pickle_state_dict(path: Path) -> dict:
    """``torch.load`` with ``weights_only=True`` only; unwraps ``{"state_dict": ...}``."""
    return _unwrap_state_dict(load_weights_only(path), path)


def load_weights_only(path: Path):
    """What a pickle holds, through ``torch.load(weights_only=True)`` (memory-mapped when the file is a zip).

    Every failure is a CheckpointError naming the file; torch's own text, which suggests
    ``weights_only=False``, never reaches the user."""
    import pickle

    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the outcome is what the user needs
            warnings.simplefilter("ignore")
            return _torch_load(torch, path)
    except pickle.UnpicklingError as exc:  # the weights-only loader refused it
        raise UnsafeCheckpointError(
            f"{path.name} cannot be loaded safely: it is a pickle that needs code to run{_offending_global(exc)}, "
            "which Nekoya refuses to run (it could do anything on your computer), or it is damaged. "
            "Use a .safetensors version of this file, or convert it with a tool you trust."
        ) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, IndexError, KeyError... on damaged files
        raise CheckpointError(f"{path.name} {DAMAGED_PICKLE}") from exc


def _torch_load(torch, path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


DAMAGED_PICKLE = ("cannot be read as a torch checkpoint: it is truncated or damaged, or not a .ckpt/.pt file at all; "
                  "copy or download it again")


def _offending_global(exc: Exception) -> str:
    """The global the pickle asked for, e.g. " (it asks for io.open)", from torch's message."""
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    return f" (it asks for {match[1]})" if match else ""


def _unwrap_state_dict(obj, path: Path) -> dict:
    import torch

    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name} does not contain a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path.name} contains no tensors")
    return tensors
