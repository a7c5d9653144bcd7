"""Writing LoRA files: sd-scripts' names, sshs hashes, and atomic replacement.

Every file is written to a temporary file in the same folder, flushed to disk and
renamed over the target, so a crash or a full disk never leaves a half-written
LoRA, and the previous file of that name survives a failed save.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import Callable

import torch

SAVE_DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FILE_EXTENSIONS = {"safetensors": ".safetensors", "ckpt": ".ckpt", "pt": ".pt"}


class SaveError(OSError):
    """A file could not be written; the previous file at that path is unchanged."""


# -- names (sd-scripts' train_util.get_*_ckpt_name) ------------------------------------
def epoch_file_name(output_name: str, epoch: int, ext: str) -> str:
    return f"{output_name}-{epoch:06d}{ext}"


def step_file_name(output_name: str, step: int, ext: str) -> str:
    return f"{output_name}-step{step:08d}{ext}"


def final_file_name(output_name: str, ext: str) -> str:
    return f"{output_name}{ext}"


def epoch_to_remove(epoch: int, every_n_epochs: int, keep_last_n: int) -> int | None:
    """After saving ``epoch``, the epoch whose file falls out of the last-N window."""
    if keep_last_n <= 0 or every_n_epochs <= 0:
        return None
    old = epoch - every_n_epochs * keep_last_n
    return old if old > 0 else None


def step_to_remove(step: int, every_n_steps: int, keep_last_n_steps: int) -> int | None:
    """sd-scripts' save_last_n_steps rule: keep files of the last N steps."""
    if keep_last_n_steps <= 0 or every_n_steps <= 0:
        return None
    old = step - keep_last_n_steps - 1
    old -= old % every_n_steps
    return old if old > 0 else None


# -- atomic writes -----------------------------------------------------------------------
def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync it and rename it over ``path``.

    On any failure the temporary file is removed, ``path`` is left as it was, and a
    ``SaveError`` says so.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _remove_quietly(tmp)
        kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise SaveError(f"could not save {path}: {exc}; {kept}") from exc
    _fsync_folder(folder)


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable where the OS allows it (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# -- LoRA files ------------------------------------------------------------------------------
def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) exactly as sd-scripts computes them.

    Serialised with only the ``ss_*`` metadata; the model hash covers the tensor data
    after the header (A1111's "addnet" hash), the legacy hash 64 KiB at offset 1 MiB.
    """
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(memoryview(data)[0x100000 : 0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_lora_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a LoRA as .safetensors (with metadata and sshs hashes) or, for .ckpt/.pt,
    as a torch-saved state dict (sd-scripts writes no metadata there)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        model_hash, legacy_hash = sshs_hashes(tensors, metadata)
        full = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, full))
    else:
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        atomic_write_bytes(path, buffer.getvalue())
