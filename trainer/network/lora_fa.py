"""LoRA-FA: sd-scripts' ``networks.lora_fa`` module (LoRA with a frozen down projection), on Nekoya's models.

As in sd-scripts: ``lora_down`` starts from a normal distribution with std ``sqrt(2 / (in + rank))`` (the paper's
init; ``in`` = the layer's input features or channels) and never changes, ``lora_up`` starts at 0 and is the only
trained weight; the forward (dropouts included) and the file (``lora_down.weight``, ``lora_up.weight``, ``alpha``)
are networks.lora's. Here the frozen down weight is a buffer: saved, moved and cast with the module, never handed
to the optimizer (sd-scripts passes only ``lora_up`` to it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .module import LoRAModule


class LoRAFAModule(LoRAModule):
    def __init__(self, lora_name: str, org_module: nn.Module, rank: int, alpha: float | None, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 init_generator: torch.Generator | None = None) -> None:
        super().__init__(lora_name, org_module, rank, alpha, dropout, rank_dropout, module_dropout, init_generator)
        in_dim = org_module.in_channels if isinstance(org_module, nn.Conv2d) else org_module.in_features
        down = torch.empty_like(self.lora_down.weight)
        nn.init.normal_(down, std=math.sqrt(2.0 / (in_dim + self.rank)), generator=init_generator)
        del self.lora_down.weight  # a buffer from here on: frozen, yet saved as <name>.lora_down.weight
        self.lora_down.register_buffer("weight", down)
