"""The group's gradient averaging: PyTorch's DistributedDataParallel over the LoRA's trained parameters.

DDP wraps a small module whose only parameters are the network's and whose forward is the family's
prediction, so the frozen model stays out of DDP (nothing of it is broadcast or reduced) while DDP sees each
step's forward and averages the LoRA's gradients across the processes in the backward pass.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from trainer.distributed.group import Group


class _Prediction(torch.nn.Module):
    def __init__(self, family: Any, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network  # a submodule: DDP reduces its trainable parameters
        self._family = (family,)  # not a submodule: the frozen model is the same on every process

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Any, batch: Any) -> torch.Tensor:
        return self._family[0].predict(noisy, timesteps, cond, batch)


def group_prediction(group: Group, family: Any, network: torch.nn.Module, device: torch.device) -> Callable:
    """``family.predict`` for one process; for a group, the same through DDP (gradients averaged)."""
    if not group.several:
        return family.predict
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters: module dropout and text-encoder LoRAs (used before the forward) vary the graph
    return DistributedDataParallel(_Prediction(family, network), device_ids=[device.index] if device.type == "cuda"
                                   else None, broadcast_buffers=False, find_unused_parameters=True)
