"""The modules of kohya_ss's Kohya LoHa, Kohya LoKr, Kohya DyLoRA and LoRA-FA types (sd-scripts' networks.loha,
networks.lokr, networks.dylora, networks.lora_fa) on the layers Nekoya's targets find.

The layers are sd-scripts' for these networks: Transformer2DModel children (plus ResnetBlock2D/Downsample2D/
Upsample2D when conv LoRA is on) and the text encoders' CLIPAttention/CLIPMLP children (networks.loha/lokr's SDXL
ArchConfig, networks.dylora's and networks.lora_fa's target lists are these same classes), named as sd-scripts
names them; each layer's rank and alpha are the spec's (``NetworkSpec.rank_for``), 0 meaning no module.
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.lora_types import KOHYA_DYLORA, KOHYA_LOHA, KOHYA_LOKR, LORA_FA
from trainer.network_spec import NetworkConfigError, NetworkSpec

from .dylora import DyLoRAModule
from .kohya_loha_lokr import KohyaLoHaModule, KohyaLoKrModule
from .lora_fa import LoRAFAModule
from .targets import Role, TargetLayer


def build_kohya_type_modules(layers: list[TargetLayer], spec: NetworkSpec,
                             init_generator: torch.Generator | None) -> list[tuple[str, nn.Module, Role]]:
    """(kohya key name, module, role) for every layer with a rank, in the layers' order."""
    built = []
    for layer in layers:
        rank, alpha = spec.rank_for(layer)
        if rank <= 0:
            continue
        built.append((layer.lora_name, _module(layer, rank, alpha, spec, init_generator), layer.role))
    return built


def _module(layer: TargetLayer, rank: int, alpha: float, spec: NetworkSpec,
            generator: torch.Generator | None) -> nn.Module:
    name, org = layer.lora_name, layer.module
    if spec.network_module == KOHYA_LOHA:
        return KohyaLoHaModule(name, org, rank, alpha, spec.rank_dropout, spec.module_dropout, spec.use_tucker,
                               init_generator=generator)
    if spec.network_module == KOHYA_LOKR:
        return KohyaLoKrModule(name, org, rank, alpha, spec.rank_dropout, spec.module_dropout, spec.use_tucker,
                               spec.lokr_factor, init_generator=generator)
    if spec.network_module == KOHYA_DYLORA:
        if rank % spec.dylora_unit:
            raise NetworkConfigError(f"Kohya DyLoRA: the rank ({rank}) of {name} must be a multiple of the DyLoRA "
                                     f"unit ({spec.dylora_unit}), as sd-scripts' networks.dylora requires", "unit")
        return DyLoRAModule(name, org, rank, alpha, spec.dylora_unit, init_generator=generator)
    if spec.network_module == LORA_FA:
        return LoRAFAModule(name, org, rank, alpha, spec.dropout, spec.rank_dropout, spec.module_dropout,
                            init_generator=generator)
    raise NetworkConfigError(f"{spec.network_module} is not one of sd-scripts' LoHa/LoKr/DyLoRA/LoRA-FA modules",
                             "LoRA_type")
