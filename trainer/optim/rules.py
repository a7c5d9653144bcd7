"""The rules that decide what a run does, torch-free: preflight reports them, the trainer runs them.

* Adafactor runs with ``relative_step=True`` unless told otherwise (transformers' and
  sd-scripts' default; ``warmup_init=True`` forces it): it then sets its own step size
  and schedule.
* Mixed precision: what a device really runs for what was asked. On a CPU, bf16 runs
  where the CPU has bf16 instructions and fp16 never (training runs in fp32); a GPU
  without bf16 runs fp16 instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .table import OPTIMIZERS, is_schedule_free, optimizer_kind

HALF = ("fp16", "bf16")


def is_adafactor(optimizer: str | None) -> bool:
    kind = optimizer_kind(optimizer)
    return kind is not None and kind is OPTIMIZERS["adafactor"]


def adafactor_relative_step(kwargs: dict[str, Any]) -> bool:
    """Whether Adafactor runs with relative_step=True: its default, and forced by warmup_init=True."""
    merged = {**OPTIMIZERS["adafactor"].defaults, **kwargs}
    return bool(merged.get("relative_step")) or bool(merged.get("warmup_init"))


def effective_scheduler(optimizer: str | None, kwargs: dict[str, Any], lr_scheduler: str) -> str:
    """The schedule that runs: Adafactor with relative_step runs its own ("adafactor"); the adafactor
    schedule without relative_step cannot run (it crashes in sd-scripts), so "constant" runs. A Schedule-Free
    optimizer schedules itself: sd-scripts gives it a constant (dummy) scheduler."""
    if is_schedule_free(optimizer):
        return "constant"
    if is_adafactor(optimizer):
        if adafactor_relative_step(kwargs):
            return "adafactor"
        if lr_scheduler == "adafactor":
            return "constant"
    return lr_scheduler


@dataclass(frozen=True)
class PrecisionNote:
    field: str
    message: str
    fix: str = ""


@dataclass(frozen=True)
class PrecisionChoice:
    """What runs: ``mode`` "no", "fp16" or "bf16" (autocast dtype; frozen weights in it too), ``full``
    when the LoRA weights are in that half dtype as well (full_fp16 / full_bf16)."""

    device: str  # "cuda" or "cpu": where the trainer runs
    mode: str
    full: bool
    notes: tuple[PrecisionNote, ...] = ()
    fp8_base: bool = False  # frozen UNet / text encoder weights stored in float8 (sd-scripts' fp8_base)

    @property
    def grad_scaler(self) -> bool:
        return self.mode == "fp16"


def decide_precision(settings: Any, device: str, native_bf16: bool = False, gpu_bf16: bool = True) -> PrecisionChoice:
    """The precision a run that asks for ``settings.mixed_precision`` gets on ``device``, with a note for
    each way that differs from the settings."""
    wanted = settings.mixed_precision if settings.mixed_precision in HALF else "no"
    mode, notes = wanted, []
    if wanted != "no" and device != "cuda":
        mode, note = cpu_mixed_precision(wanted, native_bf16)
        notes += [PrecisionNote("mixed_precision", note)] if note else []
    elif wanted == "bf16" and not gpu_bf16:
        mode = "fp16"
        notes.append(PrecisionNote("mixed_precision", "this GPU has no bf16; using fp16 mixed precision instead"))
    full = {"fp16": bool(settings.full_fp16), "bf16": bool(settings.full_bf16)}
    if mode == wanted:  # else the note above already says the LoRA runs in another precision
        for half, asked in full.items():
            if asked and mode != half:
                notes.append(PrecisionNote(f"full_{half}", f"needs Mixed precision {half} (it is {settings.mixed_precision}); "
                                           "the LoRA weights stay fp32", f"set Mixed precision to {half}, or untick it"))
    fp8, fp8_note = _fp8_base(settings, device, mode)
    notes += [fp8_note] if fp8_note else []
    return PrecisionChoice(device, mode, full.get(mode, False), tuple(notes), fp8)


def _fp8_base(settings: Any, device: str, mode: str) -> tuple[bool, PrecisionNote | None]:
    """sd-scripts stores the frozen weights in float8 with fp8_base, on a GPU and under mixed precision only."""
    if not getattr(settings, "fp8_base", False):
        return False, None
    if device != "cuda":
        return False, PrecisionNote("fp8_base", "fp8 base needs an NVIDIA GPU (CUDA); on this computer the frozen "
                                    "weights stay in the training precision (same result, more memory)")
    if mode == "no":
        return False, PrecisionNote("fp8_base", "fp8 base needs Mixed precision fp16 or bf16 (as in sd-scripts); "
                                    "the frozen weights stay fp32", "set Mixed precision to bf16 or fp16")
    return True, None


def cpu_mixed_precision(wanted: str, native_bf16: bool) -> tuple[str, str | None]:
    """What a CPU run does with Mixed precision ``wanted``. bf16 runs where the CPU has bf16
    instructions (there it is ~1.6x faster than fp32 and halves the weights' memory; sd-scripts,
    through accelerate, also trains in bf16 on a CPU); elsewhere it would be slower than fp32."""
    if wanted == "bf16" and native_bf16:
        return "bf16", None
    if wanted == "bf16":
        return "no", ("mixed precision bf16 is slower than fp32 on a CPU without bf16 instructions (AVX512-BF16 "
                      "or AMX); on this computer training runs in fp32 (same result, more memory)")
    if wanted == "fp16":
        tip = "; this CPU has bf16 instructions, so Mixed precision bf16 would be faster" if native_bf16 else ""
        return "no", ("mixed precision fp16 needs a GPU; on this computer training runs in fp32 (slower and uses "
                      f"more memory, but the same result){tip}")
    return "no", None
