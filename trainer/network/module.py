"""One LoRA module: a low-rank update added to the output of a frozen Linear/Conv2d.

As in sd-scripts, the original layer is not replaced; its ``forward`` is wrapped, so
the base model's module tree (and its state dict) stays exactly as it was.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn


class DropoutDraws:
    """A run's dropout randomness. Each batch takes one seed from the run's (CPU) generator, and a module's
    draws in that batch are a function of that seed and the module's key: a block that gradient
    checkpointing runs again in backward draws the same masks (checkpointing restores only the global RNG)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.batch_seed = 0

    def next_batch(self) -> None:
        self.batch_seed = int(torch.randint(2**62, (1,), generator=self.generator).item())

    def seed_for(self, key: int) -> int:
        return (self.batch_seed + key * 0x9E3779B97F4A7C15) % 2**63


def _module_draw(seed: int | None) -> float:
    """The module-dropout draw: a CPU number (no device sync), from the batch's seed when there is one."""
    return random.Random(seed).random() if seed is not None else torch.rand(1).item()


def _uninitialised(layer_class, *args, **kwargs) -> nn.Module:
    """A layer whose weight is allocated on the CPU but not initialised (no draw from any RNG)."""
    layer = layer_class(*args, device="meta", **kwargs)
    layer.weight = nn.Parameter(torch.empty(layer.weight.shape))
    return layer


class WrappedLayer(nn.Module):
    """Wraps a frozen Linear/Conv2d's ``forward`` (sd-scripts' way): the base layer is held in a list so it is
    not a child (its weights stay out of this module's state dict) and its module tree stays as it was."""

    def __init__(self, org_module: nn.Module) -> None:
        super().__init__()
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


class LoRAModule(WrappedLayer):
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
        init_generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(org_module)
        self.lora_name = lora_name
        self.rank = int(rank)
        # built on the meta device: the layers' default init would draw from the global RNG (both are
        # initialised below); torch's skip_init does the same but costs ~5 ms a layer
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = _uninitialised(nn.Conv2d, org_module.in_channels, self.rank, org_module.kernel_size,
                                            org_module.stride, org_module.padding, bias=False)
            self.lora_up = _uninitialised(nn.Conv2d, self.rank, org_module.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = _uninitialised(nn.Linear, org_module.in_features, self.rank, bias=False)
            self.lora_up = _uninitialised(nn.Linear, self.rank, org_module.out_features, bias=False)
        # alpha 0 / None means "no scaling", i.e. alpha = rank (sd-scripts' rule).
        alpha = float(alpha) if alpha else float(self.rank)
        self.scale = alpha / self.rank
        self.register_buffer("alpha", torch.tensor(alpha))  # 0-d, saved as <name>.alpha
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=init_generator)
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = 1.0
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._linear = isinstance(org_module, nn.Linear)
        # samples in the current batch, shared by the network's modules (LoRANetwork.set_batch_size): the lean
        # models feed their Linears tokens as rows (batch * tokens, features), and rank dropout masks per sample
        self.batch_size_ref = [1]
        # the run's dropout draws and this module's key in them (LoRANetwork.set_dropout_generator); None: the
        # global RNG (networks built outside a run). A run never draws from the process-wide RNG.
        self.draws: DropoutDraws | None = None
        self.draw_key = 0
        self._mask_generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forward(x)
        if self.training and (self.module_dropout or self.dropout or self.rank_dropout):
            return self._forward_with_dropouts(x, out)
        if self._linear and x.dim() == 2:  # rows: the update and the sum in one addmm (alpha = the scale)
            lx = F.linear(x, self.lora_down.weight)
            return torch.addmm(out, lx, self.lora_up.weight.t(), alpha=self.multiplier * self.scale)
        return torch.add(out, self.lora_up(self.lora_down(x)), alpha=self.multiplier * self.scale)

    def _forward_with_dropouts(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        seed = self.draws.seed_for(self.draw_key) if self.draws is not None else None
        if self.module_dropout and _module_draw(seed) < self.module_dropout:
            return out
        generator = self._generator_for(x.device, seed)
        lx = self.lora_down(x)
        scale = self.scale
        if self.dropout:  # F.dropout cannot take a generator: the same rule, written with one
            keep = torch.rand(lx.shape, generator=generator, device=lx.device) >= self.dropout
            lx = lx * keep.to(lx.dtype) / (1.0 - self.dropout)
        if self.rank_dropout:
            lx = lx * self._rank_mask(lx, generator)
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller
        return torch.add(out, self.lora_up(lx), alpha=self.multiplier * scale)

    def _rank_mask(self, lx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Per-sample, per-rank keep mask shaped to broadcast over tokens or pixels (sd-scripts' rule)."""
        samples = self.batch_size_ref[0] if lx.dim() == 2 and lx.size(0) % self.batch_size_ref[0] == 0 else lx.size(0)
        width = lx.size(1) if lx.dim() == 4 else lx.size(-1)  # the rank (split_qkv: parts x rank)
        mask = torch.rand((samples, width), generator=generator, device=lx.device) > self.rank_dropout
        if lx.dim() == 2 and samples != lx.size(0):  # tokens as rows: each sample's rows share its mask
            mask = mask.repeat_interleave(lx.size(0) // samples, dim=0)
        elif lx.dim() == 3:  # (batch, tokens, rank)
            mask = mask.unsqueeze(1)
        elif lx.dim() == 4:  # (batch, rank, h, w)
            mask = mask[:, :, None, None]
        return mask.to(lx.dtype)

    def _generator_for(self, device: torch.device, seed: int | None) -> torch.Generator | None:
        """This module's mask generator on ``device``, seeded for this batch (None: the global RNG)."""
        if seed is None:
            return None
        if self._mask_generator is None or self._mask_generator.device != device:
            self._mask_generator = torch.Generator(device=device)
        return self._mask_generator.manual_seed(seed)

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
