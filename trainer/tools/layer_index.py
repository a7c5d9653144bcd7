"""Every layer a LoRA file's module can name: the trainer's targets, and the rest of the same models.

LyCORIS presets reach layers outside the trainer's target classes (SD's ``conv_in``, ``time_embedding``,
``conv_out``), under the same kohya naming rule; sd-scripts' merge finds a layer by that name wherever it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from trainer.network.targets import TargetLayer, layer_kind, lora_name
from trainer.tools.base_modules import BaseModules, base_modules, family_adapter, lora_targets_of


@dataclass(frozen=True)
class ModelLayers:
    """The family's target layers (and their alias names), plus every other Linear/Conv2d of the same roots."""

    base: BaseModules
    extra: dict[str, TargetLayer] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.base.family

    @property
    def layers(self) -> dict[str, TargetLayer]:
        return self.base.layers

    @property
    def aliases(self) -> dict[str, TargetLayer]:
        return self.base.aliases

    def find(self, name: str) -> TargetLayer | None:
        return self.base.find(name) or self.extra.get(name)

    def count_by_prefix(self) -> dict[str, int]:
        return self.base.count_by_prefix()


def model_layers(family: str, unet: nn.Module, text_encoders: tuple) -> ModelLayers:
    """The layers of these models by kohya name (SDXL: sd-scripts' SGM names, diffusers names as aliases)."""
    base = base_modules(family, unet, text_encoders, with_conv=True)
    return ModelLayers(base, _other_layers(base, lora_targets_of(family_adapter(family, unet, text_encoders))))


def as_model_layers(modules) -> ModelLayers:
    return modules if isinstance(modules, ModelLayers) else ModelLayers(modules)


def _other_layers(base: BaseModules, targets) -> dict[str, TargetLayer]:
    known = {id(layer.module) for layer in (*base.layers.values(), *base.aliases.values())}
    extra: dict[str, TargetLayer] = {}
    for target in targets:
        for path, module in target.root.named_modules():
            kind = layer_kind(module)
            if path and kind is not None and id(module) not in known:
                name = lora_name(target.prefix, target.path_prefix + path, "")
                extra.setdefault(name, TargetLayer(name, module, kind, target.role))
    return extra
