"""Kohya DyLoRA: sd-scripts' own ``networks.dylora`` module, on Nekoya's models.

The module is a LoRA (``lora_down`` rank x in, ``lora_up`` out x rank, ``alpha``) kept as one parameter per rank
row, as sd-scripts keeps it. At each training forward it draws ``b = randint(0, rank - 1)`` rounded down to a
multiple of ``unit``: only rows ``b .. b + unit - 1`` of down and columns of up learn (the others get no gradient),
the update uses every row, and it is scaled by ``alpha / rank * sqrt(rank / (b + unit))``. Outside training the
update is the plain LoRA's (``alpha / rank``), as any loader applies the saved file.

The file holds what sd-scripts' DyLoRAModule.state_dict writes: ``lora_down.weight``, ``lora_up.weight`` (1x1
convs: with the 1 x 1 kernel) and ``alpha``, i.e. an ordinary LoRA whose first ranks can be cut off
(sd-scripts' extract_lora_from_dylora). sd-scripts' DyLoRA reads no dropout and has no max-norm rule.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from .module import DropoutDraws, WrappedLayer


class DyLoRAModule(WrappedLayer):
    def __init__(self, lora_name: str, org_module: nn.Module, rank: int, alpha: float | None, unit: int = 1,
                 init_generator: torch.Generator | None = None) -> None:
        super().__init__(org_module)
        self.lora_name = lora_name
        self.rank, self.unit = int(rank), int(unit)
        if self.unit < 1 or self.rank % self.unit:
            raise ValueError(f"rank {self.rank} must be a multiple of unit {self.unit}")
        self.is_conv = isinstance(org_module, nn.Conv2d)
        if self.is_conv:
            in_dim, out_dim = org_module.in_channels, org_module.out_channels
            self.kernel_size = tuple(org_module.kernel_size)
            self._stride, self._padding = org_module.stride, org_module.padding
        else:
            in_dim, out_dim = org_module.in_features, org_module.out_features
            self.kernel_size = None
        self.is_conv_kxk = self.is_conv and self.kernel_size != (1, 1)
        row = (1, in_dim, *self.kernel_size) if self.is_conv_kxk else (1, in_dim)
        column = (out_dim, 1, 1, 1) if self.is_conv_kxk else (out_dim, 1)
        # sd-scripts: kaiming_uniform_(a=√5) on each down row (fan-in = the row's size, as for the whole matrix)
        # and zeros up: drawn once for the whole matrix, then split into rows
        down = torch.empty(self.rank, *row[1:])
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=init_generator)
        self.lora_down = nn.ParameterList([nn.Parameter(r.clone()) for r in down.split(1, dim=0)])
        self.lora_up = nn.ParameterList([nn.Parameter(torch.zeros(column)) for _ in range(self.rank)])
        # alpha 0 / None means alpha = rank (sd-scripts' rule)
        self.register_buffer("alpha", torch.tensor(float(alpha) if alpha else float(self.rank)))
        self.scale = self.alpha.item() / self.rank
        self.register_load_state_dict_post_hook(lambda module, _keys: module._rescale())
        self.multiplier = 1.0
        self.draws: DropoutDraws | None = None  # the run's draws (LoRANetwork.set_dropout_generator)
        self.draw_key = 0
        self.last_block: int | None = None  # the first trained row of the last training forward (for tests)

    def _rescale(self) -> None:
        self.scale = self.alpha.item() / self.rank

    def trained_block(self) -> int:
        """sd-scripts' draw: ``randint(0, rank - 1)`` rounded down to a multiple of unit; from the batch's seed
        in a run (a checkpointed block that runs again draws the same), else from Python's global RNG."""
        draw = (random.Random(self.draws.seed_for(self.draw_key)) if self.draws is not None else random).randint(
            0, self.rank - 1)
        return draw - draw % self.unit

    def _weights(self, block: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of all ranks; with ``block``, only its ``unit`` rows carry gradients."""
        def part(params, i):
            return params[i] if block is None or block <= i < block + self.unit else params[i].detach()

        down = torch.cat([part(self.lora_down, i) for i in range(self.rank)], dim=0)
        up = torch.cat([part(self.lora_up, i) for i in range(self.rank)], dim=1)
        return down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forward(x)
        block = self.trained_block() if self.training else None
        down, up = self._weights(block)
        scale = self.scale
        if block is not None:
            self.last_block = block
            scale = scale * math.sqrt(self.rank / (block + self.unit))
        if self.is_conv_kxk:
            lx = F.conv2d(F.conv2d(x, down, stride=self._stride, padding=self._padding), up)
        elif self.is_conv:  # 1x1: sd-scripts runs it as a Linear over the pixels
            lx = F.conv2d(F.conv2d(x, down[:, :, None, None]), up[:, :, None, None])
        else:
            lx = F.linear(F.linear(x, down), up)
        return out + lx * (self.multiplier * scale)

    def delta_weight(self) -> torch.Tensor:
        """The weight change of the saved LoRA (all ranks, alpha / rank), in the layer's weight shape."""
        down, up = (w.detach().float() for w in self._weights(None))
        if self.is_conv_kxk:
            delta = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            delta = up.flatten(1) @ down.flatten(1)
            if self.is_conv:
                delta = delta[:, :, None, None]
        return delta * self.scale * self.multiplier

    def apply_max_norm(self, max_norm: float, device) -> tuple[None, float]:
        """sd-scripts' networks.dylora has no max-norm rule (train_network turns scale_weight_norms off)."""
        return None, 0.0

    # -- the file: an ordinary LoRA's keys, as sd-scripts' DyLoRAModule.state_dict writes them ----------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for i in range(self.rank):
            sd.pop(f"{prefix}lora_down.{i}", None)
            sd.pop(f"{prefix}lora_up.{i}", None)
        down, up = self._weights(None)
        if self.is_conv and not self.is_conv_kxk:
            down, up = down[:, :, None, None], up[:, :, None, None]
        sd[f"{prefix}lora_down.weight"] = down if keep_vars else down.detach()
        sd[f"{prefix}lora_up.weight"] = up if keep_vars else up.detach()
        return sd

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        down = state_dict.pop(f"{prefix}lora_down.weight", None)
        up = state_dict.pop(f"{prefix}lora_up.weight", None)
        if down is not None and up is not None:
            if self.is_conv and not self.is_conv_kxk:
                down, up = down.flatten(1), up.flatten(1)
            state_dict.update({f"{prefix}lora_down.{i}": down[i:i + 1] for i in range(down.size(0))})
            state_dict.update({f"{prefix}lora_up.{i}": up[:, i:i + 1] for i in range(up.size(1))})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
