"""Any kohya-format LoRA file applied to a loaded base model through our own network code.

The file's module names are matched with the layers the family adapter names
(the trainer's own rules, with diffusers-spelled SDXL UNet names accepted as
aliases), so SD1, SD2 and SDXL LoRAs from sd-scripts, kohya_ss or Nekoya all
load. The LoRA is applied as forward hooks with ``multiplier = weight`` and is
removed by restoring the hooked layers: the base weights are never changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.network.network import LoRANetwork, NetworkSpec
from trainer.problems import NekoyaError


class LoraMismatchError(NekoyaError, ValueError):
    """The LoRA file does not fit the base model (message meant for the user)."""


@dataclass
class AppliedLora:
    path: Path
    network: LoRANetwork
    matched: int
    unmatched: list[str] = field(default_factory=list)  # module names of the file with no layer here
    misfit: list[str] = field(default_factory=list)  # matched by name, wrong shape (another architecture)
    problems: list[str] = field(default_factory=list)  # keys that are not plain LoRA (LoHa, DoRA...)

    def notes(self) -> list[str]:
        """What the user should know about how much of the file was used."""
        out = []
        if self.unmatched:
            out.append(f"{len(self.unmatched)} module(s) of {self.path.name} have no layer in this model "
                       f"(e.g. {self.unmatched[0]}) and are left out")
        if self.misfit:
            out.append(f"{len(self.misfit)} module(s) of {self.path.name} do not fit this model's layer shapes "
                       f"(e.g. {self.misfit[0]}) and are left out")
        out += [f"{self.path.name}: {p}" for p in self.problems]
        return out


def build_lora(path, family_key: str, family, device: torch.device, dtype: torch.dtype) -> AppliedLora:
    """A network holding the file's weights for the family's layers (not applied yet)."""
    from trainer.tools.base_modules import base_modules
    from trainer.tools.lora_file import LoraFormatError, read_lora, shapes_fit

    try:
        lora = read_lora(path)
    except LoraFormatError as exc:
        raise LoraMismatchError(str(exc)) from exc
    base = base_modules(family_key, family.unet, family.text_encoders)
    layers, weights, unmatched, misfit = {}, {}, [], []
    for name, module in lora.modules.items():
        layer = base.find(name)
        if layer is None:
            unmatched.append(name)
        elif not shapes_fit(module.delta_shape(), tuple(layer.module.weight.shape)):
            misfit.append(name)
        else:
            layers[layer.lora_name], weights[layer.lora_name] = layer, module
    if not layers:
        raise LoraMismatchError(f"{Path(path).name} does not fit this {family_key.upper()} model: none of its "
                                f"{len(lora.modules)} modules matches a layer; is it a LoRA for another model family?")
    spec = NetworkSpec(module_ranks={n: w.rank for n, w in weights.items()},
                       module_alphas={n: float(w.alpha) for n, w in weights.items()})
    network = LoRANetwork(layers.values(), spec)
    _copy_weights(network, weights)
    network.to(device, dtype=dtype).eval().requires_grad_(False)
    return AppliedLora(Path(path), network, len(layers), unmatched, misfit, list(lora.problems))


def _copy_weights(network: LoRANetwork, weights: dict) -> None:
    """File tensors into the modules; a 1x1-conv LoRA on a Linear layer (or the reverse) is reshaped."""
    with torch.no_grad():
        for module in network.lora_modules():
            source = weights[module.lora_name]
            module.lora_down.weight.copy_(source.down.reshape(module.lora_down.weight.shape))
            module.lora_up.weight.copy_(source.up.reshape(module.lora_up.weight.shape))
