"""sd-scripts' ``split_qkv`` LoRA (networks.lora_flux): separate LoRAs for the parts of a fused Linear.

A FLUX.1 double block's ``qkv`` gets one LoRA each for q, k and v; a single block's ``linear1`` one each for q, k,
v and the MLP input. Each part has the module's rank and its own down and up weights; the update is
``cat(up_i(down_i(x))) * alpha / rank``. The file holds one module as sd-scripts' ``LoRANetwork.state_dict``
writes it: ``lora_down.weight`` the parts' down weights stacked (parts x rank rows), ``lora_up.weight``
block-diagonal (each part's up weight on its own rows and rank columns), ``alpha`` unchanged. Loading such a file
splits it back (sd-scripts' ``load_state_dict``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .module import LoRAModule, _uninitialised


class _Stacked(nn.ModuleList):
    """The parts' down Linears: their outputs side by side; ``weight`` is their rows stacked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([down(x) for down in self], dim=-1)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([down.weight for down in self], dim=0)


class _BlockDiagonal(nn.ModuleList):
    """The parts' up Linears, each reading its own ``rank`` columns; ``weight`` is block-diagonal."""

    def __init__(self, layers: list[nn.Module], rank: int) -> None:
        super().__init__(layers)
        self.rank = rank

    def forward(self, lx: torch.Tensor) -> torch.Tensor:
        return torch.cat([up(part) for up, part in zip(self, lx.split(self.rank, dim=-1))], dim=-1)

    @property
    def weight(self) -> torch.Tensor:
        return torch.block_diag(*[up.weight for up in self])


def _linear(in_features: int, out_features: int, weight: torch.Tensor) -> nn.Linear:
    layer = _uninitialised(nn.Linear, in_features, out_features, bias=False)
    layer.weight.data.copy_(weight)
    return layer


class SplitLoRAModule(LoRAModule):
    """A LoRA per part of a fused Linear (``split_dims``: the parts' output widths, summing to its output)."""

    def __init__(self, lora_name: str, org_module: nn.Linear, rank: int, alpha: float | None, split_dims: list[int],
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 init_generator: torch.Generator | None = None) -> None:
        super().__init__(lora_name, org_module, rank, alpha, dropout, rank_dropout, module_dropout, init_generator)
        if not isinstance(org_module, nn.Linear) or sum(split_dims) != org_module.out_features:
            raise ValueError(f"{lora_name}: split_dims {split_dims} must sum to a Linear's output width")
        self.split_dims = list(split_dims)
        in_features = org_module.in_features
        # sd-scripts: kaiming_uniform_(a=√5) on each part's down weight (the same bound: fan-in is in_features)
        down = torch.empty(len(split_dims) * self.rank, in_features)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=init_generator)
        self.lora_down = _Stacked([_linear(in_features, self.rank, part) for part in down.split(self.rank)])
        self.lora_up = _BlockDiagonal([_linear(self.rank, width, torch.zeros(width, self.rank))
                                       for width in split_dims], self.rank)

    # -- the file: one module, as sd-scripts' LoRANetwork.state_dict merges it ---------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for i in range(len(self.split_dims)):
            sd.pop(f"{prefix}lora_down.{i}.weight", None)
            sd.pop(f"{prefix}lora_up.{i}.weight", None)
        down, up = self.lora_down.weight, self.lora_up.weight
        sd[f"{prefix}lora_down.weight"] = down if keep_vars else down.detach()
        sd[f"{prefix}lora_up.weight"] = up if keep_vars else up.detach()
        return sd

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        down = state_dict.pop(f"{prefix}lora_down.weight", None)
        up = state_dict.pop(f"{prefix}lora_up.weight", None)
        if down is not None:  # (parts x rank, in): each part's rows
            state_dict.update({f"{prefix}lora_down.{i}.weight": part
                               for i, part in enumerate(down.chunk(len(self.split_dims), dim=0))})
        if up is not None:  # (out, parts x rank): each part's block
            rank, row = up.size(1) // len(self.split_dims), 0
            for i, width in enumerate(self.split_dims):
                state_dict[f"{prefix}lora_up.{i}.weight"] = up[row:row + width, i * rank:(i + 1) * rank]
                row += width
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
