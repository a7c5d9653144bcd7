"""What preflight knows about each optimizer beyond ``trainer.optim.OPTIMIZERS``
(which owns names, packages and the adaptive-lr flag): learning-rate style and state size.

``state_bytes``: optimizer state per trainable parameter (two fp32 moments for
AdamW = 8 bytes, one 8-bit moment for Lion8bit = 1 byte, ...), for the memory
estimate. ``lr_range``: the learning rates people use for LoRA with it; outside it
preflight warns. Adaptive optimizers (Prodigy, DAdapt*) multiply their own step
size by the learning rate, so theirs should be about 1. Keys are the lowercase
names of ``trainer.optim.OPTIMIZERS`` (a test keeps the two tables in step).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerFacts:
    style: str  # "adam", "lion", "sgd", "adafactor", "adaptive"
    state_bytes: float
    lr_range: tuple[float, float]


_ADAM = (1e-6, 5e-3)
_LION = (1e-7, 1e-3)  # Lion wants 3-10x lower learning rates than AdamW
_SGD = (1e-5, 1.0)
_ADAPTIVE = (0.1, 10.0)


def _adam(state: float) -> OptimizerFacts:
    return OptimizerFacts("adam", state, _ADAM)


def _adaptive(state: float) -> OptimizerFacts:
    return OptimizerFacts("adaptive", state, _ADAPTIVE)


OPTIMIZER_FACTS: dict[str, OptimizerFacts] = {
    "adamw": _adam(8), "adamw8bit": _adam(2), "pagedadamw": _adam(8), "pagedadamw8bit": _adam(2),
    "pagedadamw32bit": _adam(8),
    "adafactor": OptimizerFacts("adafactor", 1, _ADAM),  # factored second moment: tiny
    "lion": OptimizerFacts("lion", 4, _LION), "lion8bit": OptimizerFacts("lion", 1, _LION),
    "pagedlion8bit": OptimizerFacts("lion", 1, _LION),
    "sgdnesterov": OptimizerFacts("sgd", 4, _SGD), "sgdnesterov8bit": OptimizerFacts("sgd", 1, _SGD),
    "prodigy": _adaptive(16),
    "dadaptation": _adaptive(12), "dadaptadampreprint": _adaptive(12), "dadaptadam": _adaptive(12),
    "dadaptadagrad": _adaptive(8), "dadaptadan": _adaptive(16), "dadaptadanip": _adaptive(16),
    "dadaptlion": _adaptive(8), "dadaptsgd": _adaptive(8),
}

# A custom "module.Class" optimizer: assume AdamW-like state and learning rates.
CUSTOM = _adam(8)


def optimizer_facts(name: str) -> OptimizerFacts:
    """Facts of an optimizer by kohya name (case-insensitive, as sd-scripts), else CUSTOM."""
    return OPTIMIZER_FACTS.get((name or "AdamW").strip().lower(), CUSTOM)
