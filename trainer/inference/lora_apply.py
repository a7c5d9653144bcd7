"""Any kohya-format LoRA file applied to a loaded base model through our own network code.

The file's module names are matched with the layers the family adapter names
(the trainer's own rules, with diffusers-spelled SDXL UNet names accepted as
aliases), so SD1, SD2 and SDXL LoRAs from sd-scripts, kohya_ss or Nekoya all
load. The LoRA is applied as forward hooks with ``multiplier = weight`` and is
removed by restoring the hooked layers: the base weights are never changed.
LyCORIS modules (LoHa, LoKr, iA3, OFT...) are rebuilt by lycoris-lora on their
layer and add, in their hook, the same weight change merging adds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trainer.network.module import LoRAModule
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
    from trainer.tools.layer_index import model_layers
    from trainer.tools.lora_file import LoraFormatError, read_lora

    try:
        lora = read_lora(path)
    except LoraFormatError as exc:
        raise LoraMismatchError(str(exc)) from exc
    index = model_layers(family_key, family.unet, family.text_encoders)
    layers, weights, hooks, unmatched, misfit = {}, {}, [], [], []
    for name in lora.names():
        layer = index.find(name)
        if layer is None:
            unmatched.append(name)
        elif name in lora.modules:
            _match_classic(lora.modules[name], layer, layers, weights, misfit)
        else:
            _match_lycoris(lora.lycoris[name], layer, hooks, misfit)
    if not layers and not hooks:
        raise LoraMismatchError(f"{Path(path).name} does not fit this {family_key.upper()} model: none of its "
                                f"{len(lora.names())} modules matches a layer; is it a LoRA for another model "
                                "family?")
    network = _network(layers, weights, hooks)
    network.to(device, dtype=dtype).eval().requires_grad_(False)
    return AppliedLora(Path(path), network, len(layers) + len(hooks), unmatched, misfit, list(lora.problems))


def _match_classic(module, layer, layers: dict, weights: dict, misfit: list) -> None:
    from trainer.tools.lora_file import shapes_fit

    if shapes_fit(module.delta_shape(), tuple(layer.module.weight.shape)):
        layers[layer.lora_name], weights[layer.lora_name] = layer, module
    else:
        misfit.append(module.name)


def _match_lycoris(weights, layer, hooks: list, misfit: list) -> None:
    from trainer.tools.lycoris_file import LycorisModuleError, rebuild

    try:
        hooks.append((layer, LycorisHook(layer.lora_name, rebuild(weights, layer.module), layer.module)))
    except LycorisModuleError:
        misfit.append(weights.name)


def _network(layers: dict, weights: dict, hooks: list) -> LoRANetwork:
    """One network: our LoRA modules for lora_down/lora_up modules, a LycorisHook for each LyCORIS one."""
    spec = NetworkSpec(module_ranks={n: w.rank for n, w in weights.items()},
                       module_alphas={n: float(w.alpha) for n, w in weights.items()})
    network = LoRANetwork(layers.values(), spec)
    _copy_weights(network, weights)
    for layer, hook in hooks:
        network.add_module(hook.lora_name, hook)
        network.roles[hook.lora_name] = layer.role
    return network


def _copy_weights(network: LoRANetwork, weights: dict) -> None:
    """File tensors into the modules; a 1x1-conv LoRA on a Linear layer (or the reverse) is reshaped."""
    with torch.no_grad():
        for module in network.lora_modules():
            if not isinstance(module, LoRAModule):
                continue
            source = weights[module.lora_name]
            module.lora_down.weight.copy_(source.down.reshape(module.lora_down.weight.shape))
            module.lora_up.weight.copy_(source.up.reshape(module.lora_up.weight.shape))


class LycorisHook(nn.Module):
    """A LyCORIS module applied as a forward hook: the layer's output plus its input through the module's
    weight change at ``multiplier`` (trainer.tools.lycoris_file.weight_delta, as merging adds it).

    LyCORIS's own ``apply_to`` is not used: for full weights it replaces the layer's weight and restores a CPU
    copy of it."""

    def __init__(self, lora_name: str, lycoris_module: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.lycoris = lycoris_module
        self.org_module = [layer]  # a list: not a child, so the network's state and .to() leave the layer alone
        self.multiplier = 1.0
        self._org_forward = None

    def apply_to(self) -> None:
        if self._org_forward is None:
            self._org_forward = self.org_module[0].forward
            self.org_module[0].forward = self.forward

    def restore(self) -> None:
        if self._org_forward is not None:
            self.org_module[0].forward = self._org_forward
            self._org_forward = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        from trainer.tools.lycoris_file import weight_delta

        out = self._org_forward(x, *args, **kwargs)
        delta, bias = weight_delta(self.lycoris, self.multiplier)
        bias = None if bias is None else bias.to(x.dtype)
        return out + self.lycoris.op(x, delta.to(x.dtype), bias, **self.lycoris.kw_dict)
