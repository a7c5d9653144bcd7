"""Device and precision: the torch dtypes of the precision a run's plan chose.

Plain ``torch.autocast`` plus a ``GradScaler`` for fp16, no accelerate: several
trainers can run in one process (tests, GUI) without a process-wide state.
The rule that picks the precision (and says why it differs from the settings) is
``trainer.optim.rules.decide_precision``; this module only turns its choice into dtypes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from trainer.optim.rules import PrecisionChoice

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    device: torch.device
    base_dtype: torch.dtype  # frozen UNet / text encoder / VAE weights
    autocast_dtype: torch.dtype | None
    network_dtype: torch.dtype  # LoRA weights (fp32 unless full_fp16 / full_bf16)
    grad_scaler: bool
    fp8_base: bool = False  # the frozen UNet and text encoders are stored in float8_e4m3fn (autocast computes)

    @classmethod
    def of(cls, choice: PrecisionChoice, device: torch.device) -> "Precision":
        if choice.mode == "no":
            return cls(device, torch.float32, None, torch.float32, False)
        half = HALF_DTYPES[choice.mode]
        return cls(device, half, half, half if choice.full else torch.float32, choice.grad_scaler, choice.fp8_base)
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
