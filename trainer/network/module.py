"""One LoRA module: a low-rank update added to the output of a frozen Linear/Conv2d.

As in sd-scripts, the original layer is not replaced; its ``forward`` is wrapped, so
the base model's module tree (and its state dict) stays exactly as it was.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRAModule(nn.Module):
    """``y = org(x) + up(down(x)) * multiplier * alpha / rank``; the update is 0 at init."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        rank: int,
        alpha: float | None,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.rank = int(rank)
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = nn.Conv2d(
                org_module.in_channels, self.rank, org_module.kernel_size, org_module.stride, org_module.padding, bias=False
            )
            self.lora_up = nn.Conv2d(self.rank, org_module.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = nn.Linear(org_module.in_features, self.rank, bias=False)
            self.lora_up = nn.Linear(self.rank, org_module.out_features, bias=False)
        # alpha 0 / None means "no scaling", i.e. alpha = rank (sd-scripts' rule).
        alpha = float(alpha) if alpha else float(self.rank)
        self.scale = alpha / self.rank
        self.register_buffer("alpha", torch.tensor(alpha))  # 0-d, saved as <name>.alpha
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = 1.0
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # Held in a list so the base layer is not registered as a child (no double state dict).
        self._org = [org_module]
        self._org_forward = None

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    def apply_to(self) -> None:
        """Route the base layer's forward through this module."""
        if self._org_forward is None:
            self._org_forward = self.org_module.forward
            self.org_module.forward = self.forward

    def restore(self) -> None:
        """Give the base layer its own forward back."""
        if self._org_forward is not None:
            self.org_module.forward = self._org_forward
            self._org_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forward(x)
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return out
        lx = self.lora_down(x)
        scale = self.scale
        if self.training and self.dropout:
            lx = nn.functional.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout:
            lx = lx * self._rank_mask(lx)
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller
        factor = self.multiplier * scale
        if factor == 1.0:  # alpha = rank: nothing to scale
            return out + self.lora_up(lx)
        return torch.add(out, self.lora_up(lx), alpha=factor)  # one kernel for the scale and the sum

    def _rank_mask(self, lx: torch.Tensor) -> torch.Tensor:
        """Per-sample, per-rank keep mask shaped to broadcast over tokens or pixels."""
        mask = torch.rand((lx.size(0), self.rank), device=lx.device) > self.rank_dropout
        if lx.dim() == 3:  # (batch, tokens, rank)
            mask = mask.unsqueeze(1)
        elif lx.dim() == 4:  # (batch, rank, h, w)
            mask = mask[:, :, None, None]
        return mask.to(lx.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The weight change this module adds to its base layer (for tests and merges)."""
        up = self.lora_up.weight.float()
        down = self.lora_down.weight.float()
        if down.dim() == 2:
            delta = up @ down
        elif down.shape[2:] == (1, 1):
            delta = (up.flatten(1) @ down.flatten(1))[:, :, None, None]
        else:
            delta = nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        return delta * self.scale * self.multiplier
