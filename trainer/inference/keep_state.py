"""Generate images in the middle of training and leave the training exactly as it was.

Everything sampling could disturb is put back afterwards: every module's train/eval
mode, and where the VAE and text encoders live (the trainer moves them to the CPU
once latents or text-encoder outputs are cached; sampling needs them on the device
for a moment). The global RNGs are not touched: a run draws only from its own
generators, and sampling from its seed's, so there is nothing of the run's there to
put back (and winding them back would undo other threads' draws).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


@contextlib.contextmanager
def training_state_kept(eval_roots: Sequence[nn.Module], needed: Sequence[nn.Module],
                        device: torch.device) -> Iterator[None]:
    """Inside: ``eval_roots`` in eval mode, ``needed`` on ``device``, no autograd. After: all as before."""
    modes = [(module, module.training) for root in eval_roots for module in root.modules()]
    moved: list[tuple[nn.Module, torch.device]] = []
    try:
        for model in needed:
            home = _device_of(model)
            if home is not None and not _same_device(home, device):
                moved.append((model, home))
                model.to(device)
        for root in eval_roots:
            root.eval()
        with torch.no_grad():
            yield
    finally:
        for model, home in moved:
            model.to(home)
        for module, training in modes:  # per module: a recursive train() would flatten mixed modes
            module.training = training
        if moved and device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed memory back to training


def _device_of(model: nn.Module) -> torch.device | None:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else None


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same place when the current device is 0."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
