"""Runtime guards the training loop calls so that no failure loses work or leaves the user guessing.

* :func:`atomic_write` — every save: temp file in the same folder, fsync, rename.
  On any error (a full disk included) the temp file is removed, the previous file
  stays as it was, and :class:`SaveError` says so and how much space is free (a full
  disk is recognised with or without an errno: :func:`is_disk_full`). Files get the
  umask's mode, as ``open()`` would give them.
* :func:`remove_stale_temp_files` — the temp files a killed save left behind.
* :func:`is_out_of_memory` — recognise an OOM (what to change then:
  :mod:`trainer.preflight.memory_advice`).
* :class:`NanGuard` — NaN/inf loss: skip the step or stop (``nan_loss_policy``),
  with the step number and a hint.
* :class:`BadImagePolicy` — an image that fails during training: skip it or stop
  (``bad_image_policy``), naming the file.

No torch import at module level: the GUI and preflight import this too.
"""
from __future__ import annotations

import errno
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trainer.families import spec_for_settings
from trainer.optim.table import is_adaptive
from trainer.problems import NekoyaError

GIB = 1024**3
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


# ---- atomic saves ----------------------------------------------------------------------------

class SaveError(NekoyaError, OSError):
    """A file could not be saved; the previous file at that path (if any) is unchanged."""

    def __init__(self, message: str, *, path: str, previous_intact: bool, free_bytes: int | None, cause_errno: int | None):
        super().__init__(cause_errno, message)
        self.message = message
        self.path = path
        self.previous_intact = previous_intact
        self.free_bytes = free_bytes
        self.disk_full = cause_errno in DISK_FULL_ERRNOS

    def __str__(self) -> str:
        return self.message


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the drive holding ``path`` (or its nearest existing parent)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def file_mode() -> int:
    """The mode a plain ``open()`` gives a new file now (0666 less the umask); mkstemp and safetensors make 0600."""
    try:  # Linux: read the umask without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


# Temp files carry the writer's pid, so a later run can tell a crashed writer's leftovers from a live one's.
TEMP_TAG = ".nekoya-"


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], None]) -> None:
    """Save via ``write_fn(temp_path)``, then fsync and rename over ``path`` in one step.

    Readers see the old file or the new one, never half a file. Raises SaveError.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{TEMP_TAG}{os.getpid()}-", suffix=".tmp",
                                   dir=folder)
        os.close(fd)
        write_fn(tmp)
        os.chmod(tmp, file_mode())  # after writing: a writer that replaces the temp file makes it 0600 again
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        if tmp is not None:
            _remove_quietly(tmp)
        raise _save_error(path, exc) from exc
    fsync_folder(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def _save_error(path: str, exc: Exception) -> SaveError:
    intact = os.path.exists(path)
    kept = f"the previous {os.path.basename(path)} is intact" if intact else "no file was written"
    free = free_bytes(path)
    full = is_disk_full(exc)
    code = getattr(exc, "errno", None) or (errno.ENOSPC if full else None)
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    message = f"could not save {path}: {reason}; {kept}"
    if full:
        message += f". {disk_full_advice(path, free, 'choose an Output folder on another drive')}"
    return SaveError(message, path=path, previous_intact=intact, free_bytes=free, cause_errno=code)


# safetensors (Rust) reports a full disk as text, without errno: "IoError(Os { code: 28, kind: StorageFull, ...
_DISK_FULL_TEXTS = ("no space left on device", "os error 28", "code: 28,", "storagefull", "disk quota exceeded",
                    "there is not enough space on the disk")


def is_disk_full(exc: BaseException | None) -> bool:
    """A full disk (or quota) anywhere in the exception's chain, with or without an errno."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) in DISK_FULL_ERRNOS or getattr(exc, "disk_full", False):
            return True
        if any(text in str(exc).lower() for text in _DISK_FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_advice(path: str | os.PathLike, free: int | None, other_place: str) -> str:
    """``The disk holding /x has 12 MiB free: free some space or <other_place>``."""
    folder = os.path.dirname(os.path.abspath(path))
    space = f"has {format_bytes(free)} free" if free is not None else "is full"
    return f"The disk holding {folder} {space}: free some space or {other_place}"


def format_bytes(count: int) -> str:
    if count >= GIB:
        return f"{count / GIB:.2f} GiB"
    return f"{count / 2**20:.0f} MiB" if count >= 2**20 else f"{count / 1024:.0f} KiB"


def fsync_folder(folder: str) -> None:
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


# ---- leftovers of crashed saves -------------------------------------------------------------

_OWN_TEMP = re.compile(re.escape(TEMP_TAG) + r"(?P<pid>\d+)-[^/\\]*\.tmp$")
# Older names: ours without a pid, and the safetensors library's own temp file (its data, renamed on success).
_LEGACY_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$|^\.tmp[A-Za-z0-9]{6}$")
LEGACY_TEMP_AGE_S = 600  # a live writer touches its temp file every moment; one this old is a crash's


def pid_alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Remove the temp files of saves whose process died (kill -9, power loss) from ``folder``.

    A temp file naming a live process is left alone (another run saving now); one without a pid is
    removed only when it is an old Nekoya/safetensors temp not written to for ``LEGACY_TEMP_AGE_S``.
    Returns the removed paths; never raises.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(".") and _is_stale_temp(entry):
            _remove_quietly(entry.path)
            removed.append(entry.path)
    return removed


def _is_stale_temp(entry: os.DirEntry) -> bool:
    try:
        if not entry.is_file(follow_symlinks=False):
            return False
        own = _OWN_TEMP.search(entry.name)
        if own:
            return not pid_alive(int(own["pid"]))
        if not _LEGACY_TEMP.match(entry.name) or time.time() - entry.stat().st_mtime < LEGACY_TEMP_AGE_S:
            return False
        return entry.name.endswith(".tmp") or _starts_like_safetensors(entry.path)
    except OSError:
        return False


def _starts_like_safetensors(path: str) -> bool:
    """A safetensors file: 8 bytes of header length, then the JSON header."""
    with open(path, "rb") as f:
        return f.read(9)[8:] == b"{"


# ---- out of memory ---------------------------------------------------------------------------

def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS out of memory (torch.OutOfMemoryError or its RuntimeError text) or a CPU MemoryError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# ---- NaN / infinite loss ---------------------------------------------------------------------

@dataclass(frozen=True)
class LossDecision:
    action: str  # "ok", "skip" (drop this step's update) or "stop"
    message: str = ""


class NanGuard:
    """Decides what to do with each step's loss. ``policy``: "stop" or "skip" (setting nan_loss_policy).

    With "skip", a bad step is dropped (no optimizer step) and the run goes on;
    after ``max_consecutive`` bad steps in a row it stops anyway.
    """

    def __init__(self, policy: str = "stop", max_consecutive: int = 10, settings=None) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"nan_loss_policy must be 'stop' or 'skip', not {policy!r}")
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.settings = settings
        self.consecutive = 0
        self.skipped_steps: list[int] = []

    def check(self, loss, step: int) -> LossDecision:
        value = float(loss)  # works for floats and 0-d tensors
        if math.isfinite(value):
            self.consecutive = 0
            return LossDecision("ok")
        self.consecutive += 1
        what = "NaN" if math.isnan(value) else "infinite"
        if self.policy == "skip" and self.consecutive < self.max_consecutive:
            self.skipped_steps.append(step)
            return LossDecision("skip", f"step {step}: the loss is {what}; this step is skipped "
                                        f"({self.consecutive} in a row, stopping at {self.max_consecutive})")
        in_a_row = f" ({self.consecutive} steps in a row)" if self.consecutive > 1 else ""
        return LossDecision("stop", f"step {step}: the loss is {what}{in_a_row}; training stopped. {self.hint()}")

    def hint(self) -> str:
        return nan_hint(self.settings)


def nan_hint(settings) -> str:
    """What usually causes NaN loss, for these settings."""
    if settings is None:
        return "Try a lower learning rate, alpha at most the rank, or bf16 instead of fp16."
    hints = []
    unet_lr, te_lr = settings.train_lrs()
    if max(unet_lr, te_lr) > 5e-4 and not is_adaptive(settings.optimizer):
        hints.append(f"lower the learning rate (now {max(unet_lr, te_lr):g}; try 1e-4)")
    if settings.network_alpha > settings.network_dim:
        hints.append(f"set Network Alpha ({settings.network_alpha:g}) to at most the rank ({settings.network_dim})")
    if settings.mixed_precision == "fp16":
        hints.append("use Mixed precision bf16 instead of fp16 (fp16 overflows)")
    if settings.full_fp16:
        hints.append("untick Full fp16 training")
    if spec_for_settings(settings).fp16_vae_overflows and settings.mixed_precision == "fp16" and not settings.sdxl_no_half_vae:
        hints.append("tick No half VAE (the SDXL VAE gives NaN in fp16)")
    if not hints:
        hints.append("check the images (a corrupt or all-black image can cause it) and try a lower learning rate")
    return "To fix: " + "; ".join(hints) + "."


# ---- bad images during training --------------------------------------------------------------

@dataclass(frozen=True)
class ImageDecision:
    action: str  # "skip" or "stop"
    message: str


@dataclass
class BadImagePolicy:
    """What to do when an image fails while training (``bad_image_policy``: "stop" or "skip").

    ``handle`` returns the decision and its message naming the file; with "skip"
    the image is remembered (``skipped``) and left out from then on (``should_skip``).
    """

    policy: str = "stop"
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason

    def __post_init__(self) -> None:
        if self.policy not in ("stop", "skip"):
            raise ValueError(f"bad_image_policy must be 'stop' or 'skip', not {self.policy!r}")

    def handle(self, path, reason: str | BaseException) -> ImageDecision:
        path = str(getattr(reason, "path", None) or path)
        why = getattr(reason, "reason", None) or str(reason)
        if self.policy == "skip":
            self.skipped[path] = why
            return ImageDecision("skip", f"{path}: {why}; the image is left out and training goes on "
                                         f"({len(self.skipped)} image(s) left out so far)")
        return ImageDecision("stop", f"{path}: {why}; training stopped. Delete or re-save this image, "
                                     "or set On unreadable image to skip to leave such images out")

    def should_skip(self, path) -> bool:
        return str(path) in self.skipped

    def summary(self) -> str:
        if not self.skipped:
            return ""
        names = ", ".join(Path(p).name for p in list(self.skipped)[:10])
        return f"{len(self.skipped)} unreadable image(s) were left out: {names}"
