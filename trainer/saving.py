"""Writing LoRA files: sd-scripts' names, sshs hashes, and atomic replacement.

Every file is written to a temporary file in the same folder, flushed to disk and
renamed over the target, so a crash or a full disk never leaves a half-written
LoRA, and the previous file of that name survives a failed save. Weights with NaN
or infinity are never written as a result (:class:`NonFiniteWeights`).
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import torch

from trainer.problems import NekoyaError
from trainer.safety import SaveError, atomic_write, atomic_write_bytes  # noqa: F401  (re-exported)

SAVE_DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FILE_EXTENSIONS = {"safetensors": ".safetensors", "ckpt": ".ckpt", "pt": ".pt"}



# -- names (sd-scripts' train_util.get_*_ckpt_name) ------------------------------------
def epoch_file_name(output_name: str, epoch: int, ext: str) -> str:
    return f"{output_name}-{epoch:06d}{ext}"


def step_file_name(output_name: str, step: int, ext: str) -> str:
    return f"{output_name}-step{step:08d}{ext}"


def final_file_name(output_name: str, ext: str) -> str:
    return f"{output_name}{ext}"


def epoch_state_name(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}-state"


def step_state_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}-state"


def final_state_name(output_name: str) -> str:
    return f"{output_name}-state"


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
        from safetensors.torch import save

        model_hash, legacy_hash = sshs_hashes(tensors, metadata)
        # serialised here, not with save_file: that writes its own temp file, which a crash leaves behind
        data = save(tensors, {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash})
    else:
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        data = buffer.getvalue()
    atomic_write_bytes(path, data)


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


class NonFiniteWeights(NekoyaError, ValueError):
    """The LoRA weights hold NaN or infinity: such a file is never saved as a result."""

    field = "nan_loss_policy"

    def __init__(self, step: int) -> None:
        super().__init__(f"the LoRA weights are NaN or infinite after step {step}; training stopped")
        self.step = step


@dataclass
class KeptWeights:
    """A LoRA (CPU tensors and its metadata) held in memory: the last finite weights of a run, or the
    weights a full disk kept from being written. ``save_to`` writes them anywhere, later."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    step: int
    epoch: int
    file_name: str  # the name the run would give it, e.g. "mylora-step00000500.safetensors"
    saved_path: str | None = None  # where it was written, if it was

    def target(self, path: str | os.PathLike) -> str:
        """The file ``save_to(path)`` writes: ``path`` itself, or ``file_name`` inside it when it is a folder."""
        path = os.fspath(path)
        if os.path.isdir(path) or not path.endswith(tuple(FILE_EXTENSIONS.values())):
            path = os.path.join(path, self.file_name)
        return path

    def save_to(self, path: str | os.PathLike) -> str:
        """Write to ``path`` (a file, or a folder to hold ``file_name``); returns the file. Raises SaveError."""
        path = self.target(path)
        save_lora_file(path, self.tensors, self.metadata)
        self.saved_path = path
        return path


# -- what a run writes, and when ---------------------------------------------------------------
class RunOutputs:
    """Writes a run's LoRA files under sd-scripts' names and keeps the last-N windows.

    ``tensors(dtype)`` gives the LoRA state dict, ``metadata(step, epoch)`` its metadata;
    ``on_saved(path, kind, step, epoch)`` is told about every file written.
    """

    def __init__(self, settings, tensors, metadata, on_saved, log=None) -> None:
        self.folder = settings.output_dir or "."
        self.name = settings.output_name
        self.ext = FILE_EXTENSIONS.get(settings.save_model_as, ".safetensors")
        self.dtype = SAVE_DTYPES.get(settings.save_precision)
        self.every_n_epochs = int(settings.save_every_n_epochs or 0)
        self.last_n_epochs = int(settings.save_last_n_epochs or 0)
        self.every_n_steps = int(settings.save_every_n_steps or 0)
        self.last_n_steps = int(getattr(settings, "save_last_n_steps", 0) or 0)
        # sd-scripts: state folders follow save_last_n_epochs unless save_last_n_epochs_state is set
        self.last_n_epoch_states = int(getattr(settings, "save_last_n_epochs_state", 0) or self.last_n_epochs)
        self.last_n_step_states = int(getattr(settings, "save_last_n_steps_state", 0) or self.last_n_steps)
        self.tensors, self.metadata, self.on_saved = tensors, metadata, on_saved
        self.log = log or (lambda message, level="info": None)
        self.files: list[str] = []
        self.last_finite: KeptWeights | None = None  # the newest finite weights saved or snapshot

    def path(self, file_name: str) -> str:
        return os.path.join(self.folder, file_name)

    def epoch_due(self, epoch: int, total_epochs: int) -> bool:
        """sd-scripts: every N epochs, but not the last one (that is the final file)."""
        return self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0 and epoch < total_epochs

    def step_due(self, step: int, total_steps: int) -> bool:
        return self.every_n_steps > 0 and step % self.every_n_steps == 0 and step < total_steps

    def save(self, kind: str, step: int, epoch: int) -> str:
        """kind: "epoch", "step", "stopped" (step-named) or "final". Raises NonFiniteWeights, SaveError."""
        return self.write(kind, self.current(step, epoch, kind))

    def current(self, step: int, epoch: int, kind: str = "stopped") -> KeptWeights:
        """The weights now, as ``kind``'s file would hold them; NonFiniteWeights if any is NaN/inf."""
        # a copy: on a CPU the state dict would share memory with the weights, which training goes on changing
        tensors = self.tensors(None, copy=True)
        if not all_finite(tensors):  # judged as trained, before a narrower save precision can overflow
            raise NonFiniteWeights(step)
        tensors = self._in_save_precision(tensors, step)
        return KeptWeights(tensors, self.metadata(step, epoch), step, epoch, self.file_name(kind, step, epoch))

    def _in_save_precision(self, tensors: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """The tensors in Save precision; a tensor that fp16 cannot hold (|x| > 65504) stays float32, with a
        warning, rather than being written as infinity or reported as a NaN."""
        if self.dtype is None:
            return tensors
        converted = {key: value.to(self.dtype) if value.is_floating_point() else value for key, value in tensors.items()}
        overflowed = [key for key, value in converted.items() if value.is_floating_point() and not torch.isfinite(value).all()]
        for key in overflowed:
            converted[key] = tensors[key].float()
        if overflowed:
            self.log(f"step {step}: {len(overflowed)} LoRA tensors (e.g. {overflowed[0]}) exceed the range of "
                     f"Save precision {self.dtype_name()} and are kept as float in this file; set Save precision "
                     "(save_precision) to bf16 or float", "warning")
        return converted

    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def weights_to_keep(self, step: int, epoch: int, kind: str) -> KeptWeights | None:
        """After a failure: the weights now (already saved, or to save as ``kind``), or the last finite
        ones when they hold NaN/inf (None when there are none)."""
        last = self.last_finite
        if last is not None and last.step == step and last.saved_path and os.path.exists(last.saved_path):
            return last
        try:
            return self.current(step, epoch, kind)
        except NonFiniteWeights:
            return last

    def snapshot(self, step: int, epoch: int) -> None:
        """Keep a CPU copy of the weights if finite: what a NaN stop falls back to."""
        try:
            self.last_finite = self.current(step, epoch)
        except NonFiniteWeights:
            pass

    def file_name(self, kind: str, step: int, epoch: int) -> str:
        if kind == "epoch":
            return epoch_file_name(self.name, epoch, self.ext)
        if kind == "final":
            return final_file_name(self.name, self.ext)
        return step_file_name(self.name, step, self.ext)  # "step", "stopped"

    def write(self, kind: str, weights: KeptWeights) -> str:
        path = weights.save_to(self.path(self.file_name(kind, weights.step, weights.epoch)))
        self.last_finite = weights
        if path not in self.files:
            self.files.append(path)
        self.on_saved(path, kind, weights.step, weights.epoch)
        self._drop_old(kind, weights.step, weights.epoch)
        return path

    def _drop_old(self, kind: str, step: int, epoch: int) -> None:
        old = None
        if kind == "epoch":
            number = epoch_to_remove(epoch, self.every_n_epochs, self.last_n_epochs)
            old = number and self.path(epoch_file_name(self.name, number, self.ext))
        elif kind == "step":
            number = step_to_remove(step, self.every_n_steps, self.last_n_steps)
            old = number and self.path(step_file_name(self.name, number, self.ext))
            self._drop_state(step_to_remove(step, self.every_n_steps, self.last_n_step_states),
                             lambda n: step_state_name(self.name, n))
        if old and os.path.exists(old):
            os.remove(old)
            if old in self.files:
                self.files.remove(old)

    def drop_old_epoch_state(self, epoch: int) -> None:
        self._drop_state(epoch_to_remove(epoch, self.every_n_epochs, self.last_n_epoch_states),
                         lambda n: epoch_state_name(self.name, n))

    def _drop_state(self, number: int | None, name_of) -> None:
        """Remove the state folder that the last-N window has just left (sd-scripts' rule)."""
        folder = number and self.path(name_of(number))
        if folder and os.path.isdir(folder):
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            if folder in self.files:
                self.files.remove(folder)
