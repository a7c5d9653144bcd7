"""Every optimizer Nekoya knows by kohya name, in one torch-free table.

The settings' dropdown, the preflight rules (package, learning-rate range, memory)
and the trainer (class, defaults, adaptive step size) all read this table; the
optimizer class itself is imported only when a run creates it.

``state_bytes``: optimizer state per trainable parameter (two fp32 moments for
AdamW = 8 bytes, one 8-bit moment for Lion8bit = 1 byte, ...), for the memory
estimate. ``lr_range``: the learning rates people use for LoRA with it; outside it
preflight warns. Adaptive optimizers (Prodigy, DAdapt*) multiply their own step
size by the learning rate, so theirs should be about 1.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

_ADAM = (1e-6, 5e-3)
_LION = (1e-7, 1e-3)  # Lion wants 3-10x lower learning rates than AdamW
_SGD = (1e-5, 1.0)
_ADAPTIVE = (0.1, 10.0)
_BNB = "bitsandbytes"
_NESTEROV = {"nesterov": True, "momentum": 0.9}
_SF = "schedulefree"


@dataclass(frozen=True)
class OptimizerKind:
    name: str  # the kohya name, as the dropdown shows it
    class_path: str  # "module.Class"
    style: str  # "adam", "lion", "sgd", "adafactor", "adaptive"
    state_bytes: float
    lr_range: tuple[float, float]
    defaults: dict[str, Any] = field(default_factory=dict)
    package: str = ""  # pip name, for the "not installed" message
    listed: bool = True  # offered in the dropdown (kohya_ss does not list PagedAdamW; it is accepted typed in)
    # Schedule-Free: the optimizer keeps two weight sequences and must be switched to eval() for sampling and
    # saving, then back to train() (sd-scripts' optimizer_eval_fn / optimizer_train_fn); it schedules itself
    schedule_free: bool = False

    @property
    def adaptive_lr(self) -> bool:
        """D-Adaptation / Prodigy: they find the step size; lr should be ~1.0."""
        return self.style == "adaptive"

    def load(self) -> type:
        module, _, name = self.class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)


def _kind(name: str, class_path: str, style: str, state: float, lr_range, package: str = "", **extra) -> OptimizerKind:
    return OptimizerKind(name, class_path, style, state, lr_range, package=package, **extra)


def _adaptive(name: str, class_path: str, state: float) -> OptimizerKind:
    return _kind(name, class_path, "adaptive", state, _ADAPTIVE, "prodigyopt" if name == "Prodigy" else "dadaptation")


_KINDS = (
    _kind("AdamW", "torch.optim.AdamW", "adam", 8, _ADAM),
    _kind("AdamW8bit", "bitsandbytes.optim.AdamW8bit", "adam", 2, _ADAM, _BNB),
    _kind("PagedAdamW", "bitsandbytes.optim.PagedAdamW", "adam", 8, _ADAM, _BNB, listed=False),
    _kind("PagedAdamW8bit", "bitsandbytes.optim.PagedAdamW8bit", "adam", 2, _ADAM, _BNB),
    _kind("PagedAdamW32bit", "bitsandbytes.optim.PagedAdamW32bit", "adam", 8, _ADAM, _BNB),
    # factored second moment: tiny state
    _kind("Adafactor", "transformers.optimization.Adafactor", "adafactor", 1, _ADAM, defaults={"relative_step": True}),
    _kind("Lion", "lion_pytorch.Lion", "lion", 4, _LION, "lion-pytorch"),
    _kind("Lion8bit", "bitsandbytes.optim.Lion8bit", "lion", 1, _LION, _BNB),
    _kind("PagedLion8bit", "bitsandbytes.optim.PagedLion8bit", "lion", 1, _LION, _BNB),
    _kind("SGDNesterov", "torch.optim.SGD", "sgd", 4, _SGD, defaults=_NESTEROV),
    _kind("SGDNesterov8bit", "bitsandbytes.optim.SGD8bit", "sgd", 1, _SGD, _BNB, defaults=_NESTEROV),
    _adaptive("Prodigy", "prodigyopt.Prodigy", 16),
    _adaptive("DAdaptation", "dadaptation.experimental.DAdaptAdamPreprint", 12),
    _adaptive("DAdaptAdam", "dadaptation.DAdaptAdam", 12),
    _adaptive("DAdaptAdaGrad", "dadaptation.DAdaptAdaGrad", 8),
    _adaptive("DAdaptAdan", "dadaptation.DAdaptAdan", 16),
    _adaptive("DAdaptAdanIP", "dadaptation.experimental.DAdaptAdanIP", 16),
    _adaptive("DAdaptAdamPreprint", "dadaptation.experimental.DAdaptAdamPreprint", 12),
    _adaptive("DAdaptLion", "dadaptation.DAdaptLion", 8),
    _adaptive("DAdaptSGD", "dadaptation.DAdaptSGD", 8),
    # kohya_ss's newer entries (installed by setup.sh as the optimizers extra)
    _kind("AdamWScheduleFree", "schedulefree.AdamWScheduleFree", "adam", 8, _ADAM, _SF, schedule_free=True),
    _kind("RAdamScheduleFree", "schedulefree.RAdamScheduleFree", "adam", 8, _ADAM, _SF, schedule_free=True),
    _kind("SGDScheduleFree", "schedulefree.SGDScheduleFree", "sgd", 4, _SGD, _SF, schedule_free=True),
    _kind("prodigyplus.ProdigyPlusScheduleFree", "prodigyplus.ProdigyPlusScheduleFree", "adaptive", 12, _ADAPTIVE,
          "prodigy-plus-schedule-free", schedule_free=True),
    _kind("pytorch_optimizer.CAME", "pytorch_optimizer.CAME", "adam", 4, _ADAM, "pytorch_optimizer"),
    _kind("bitsandbytes.optim.AdEMAMix8bit", "bitsandbytes.optim.AdEMAMix8bit", "adam", 3, _ADAM, _BNB),
    _kind("bitsandbytes.optim.PagedAdEMAMix8bit", "bitsandbytes.optim.PagedAdEMAMix8bit", "adam", 3, _ADAM, _BNB),
)
# By lowercase name: sd-scripts matches optimizer names case-insensitively.
OPTIMIZERS: dict[str, OptimizerKind] = {kind.name.lower(): kind for kind in _KINDS}
DROPDOWN_NAMES: tuple[str, ...] = tuple(kind.name for kind in _KINDS if kind.listed)
# A custom "module.Class" optimizer: assume AdamW-like state and learning rates.
CUSTOM = OptimizerKind("custom", "", "adam", 8, _ADAM)


def optimizer_kind(name: str | None) -> OptimizerKind | None:
    """The table's entry for a kohya name (case-insensitive), or None for a class path or unknown name."""
    return OPTIMIZERS.get((name or "AdamW").strip().lower())


def optimizer_facts(name: str | None) -> OptimizerKind:
    """The entry for ``name``, else CUSTOM's AdamW-like figures (for the memory estimate and lr ranges)."""
    return optimizer_kind(name) or CUSTOM


def is_adaptive(name: str | None) -> bool:
    return optimizer_facts(name).adaptive_lr


def is_schedule_free(name: str | None) -> bool:
    return optimizer_facts(name).schedule_free
