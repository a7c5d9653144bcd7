"""Pause and free GPU memory: a paused run's weights and optimizer state go to the CPU and come back.

Modules move in place (``Module.to`` keeps the Parameter objects), so the optimizer still holds the same
parameters; its state tensors move beside them. Each part goes back to the device it was on, so a VAE or
text encoder the run had already released to the CPU stays there.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch


class Offloaded:
    """What ``offload`` moved to the CPU; ``restore`` puts it back."""

    def __init__(self, modules: list[tuple[torch.nn.Module, torch.device]],
                 tensors: list[tuple[dict, Any, torch.device]]) -> None:
        self.modules, self.tensors = modules, tensors

    def restore(self) -> None:
        for module, device in self.modules:
            module.to(device)
        for state, key, device in self.tensors:
            state[key] = state[key].to(device)


def offload(device: torch.device, modules: Iterable[Any], optimizer: Any) -> tuple[Offloaded | None, str]:
    """Move the modules on ``device`` and the optimizer state to the CPU; (what to restore, what was done).
    On a CPU device nothing moves (None) and the note says so."""
    if device.type == "cpu":
        return None, "the run trains on the CPU: there is no GPU memory to free, everything stays as it is"
    moved = []
    for module in modules:
        here = _device_of(module)
        if here is not None and here.type != "cpu":
            module.to("cpu")
            moved.append((module, here))
    tensors = _optimizer_tensors_to_cpu(optimizer)
    before = _allocated_mib(device)
    _empty_cache(device)
    note = (f"weights ({len(moved)} models) and optimizer state moved to the CPU; "
            f"{before:.0f} MiB still allocated on {device}")
    return Offloaded(moved, tensors), note


def run_modules(family: Any, network: Any) -> list[Any]:
    """The frozen models and the trainable network of a run (parts a family released are None)."""
    parts = [getattr(family, "unet", None), getattr(family, "vae", None), *getattr(family, "text_encoders", ()),
             network]
    return [p for p in parts if isinstance(p, torch.nn.Module)]


def _device_of(module: torch.nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    return None


def _optimizer_tensors_to_cpu(optimizer: Any) -> list[tuple[dict, Any, torch.device]]:
    """Move the optimizer's state tensors (Adam's moments, ...) to the CPU; returns where each was."""
    moved = []
    for state in getattr(optimizer, "state", {}).values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                state[key] = value.to("cpu")
                moved.append((state, key, value.device))
    return moved


def _allocated_mib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
