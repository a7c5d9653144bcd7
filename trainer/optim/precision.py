"""Device and precision: which dtypes the base model, the LoRA and autocast use.

Plain ``torch.autocast`` plus a ``GradScaler`` for fp16, no accelerate: several
trainers can run in one process (tests, GUI) without a process-wide state.
On a CPU, bf16 runs where the CPU has bf16 instructions (AVX512-BF16, AMX); otherwise, and
for fp16, training runs in fp32 with a note (half precision is slower there, not faster).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from trainer.preflight.device import cpu_has_native_bf16, cpu_mixed_precision

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    device: torch.device
    base_dtype: torch.dtype  # frozen UNet / text encoder / VAE weights
    autocast_dtype: torch.dtype | None
    network_dtype: torch.dtype  # LoRA weights (fp32 unless full_fp16 / full_bf16)
    grad_scaler: bool
    notes: tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        """"no", "fp16" or "bf16": what actually runs."""
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.autocast_dtype, "no")

    def describe(self) -> str:
        if self.autocast_dtype is None:
            return f"training in fp32 on {self.device.type}"
        name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
        return (f"mixed precision {self.mode} on {self.device.type}: frozen weights {name(self.base_dtype)}, "
                f"LoRA weights {name(self.network_dtype)}")

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def make_scaler(self) -> "torch.amp.GradScaler | None":
        if not self.grad_scaler:
            return None
        scaler = torch.amp.GradScaler(self.device.type)
        if self.network_dtype == torch.float16:
            # full_fp16: the LoRA grads are fp16 themselves; let the scaler unscale them (as sd-scripts does).
            unscale = scaler._unscale_grads_
            scaler._unscale_grads_ = lambda opt, inv, found, _allow: unscale(opt, inv, found, True)
        return scaler


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_precision(settings, device: torch.device) -> Precision:
    notes: list[str] = []
    mixed = settings.mixed_precision if settings.mixed_precision in HALF_DTYPES else "no"
    if mixed != "no" and device.type != "cuda":
        mixed, note = cpu_mixed_precision(mixed, cpu_has_native_bf16())
        notes += [note] if note else []
    if mixed == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        notes.append("this GPU has no bf16; using fp16 mixed precision instead")
        mixed = "fp16"
    full = {"fp16": settings.full_fp16, "bf16": settings.full_bf16}
    for name, wanted in full.items():
        if wanted and mixed != name:
            notes.append(f"full_{name} needs mixed precision {name}; LoRA weights stay fp32")
    if mixed == "no":
        return Precision(device, torch.float32, None, torch.float32, False, tuple(notes))
    half = HALF_DTYPES[mixed]
    network_dtype = half if full[mixed] else torch.float32
    return Precision(device, half, half, network_dtype, mixed == "fp16", tuple(notes))
