"""The LoRA-able layers of a base model, by kohya name, through the family adapters.

The names come from the same family adapter the trainer uses
(``family.lora_targets()``), so a file the trainer writes always matches here.
UNet names in diffusers spelling are accepted as aliases where the family's own
names differ (SDXL LoRAs written by some tools use ``down_blocks`` names; sd-scripts
converts those too).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from trainer.families import family_spec, spec_for_checkpoint
from trainer.network.targets import (
    UNET_ATTENTION_CLASSES, UNET_CONV_CLASSES, LoraTarget, TargetLayer, find_target_layers,
)

# diffusers component name, in single-file order, for each text encoder of a model
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class BaseModules:
    """Target layers of one model: the family's names, and alias names for the same layers."""

    family: str
    layers: dict[str, TargetLayer]  # kohya name -> layer
    aliases: dict[str, TargetLayer]  # other accepted spelling -> layer (empty when none)

    def find(self, name: str) -> TargetLayer | None:
        return self.layers.get(name) or self.aliases.get(name)

    def count_by_prefix(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in self.layers:
            prefix = name.split("_", 2)[0] + "_" + name.split("_", 2)[1]
            counts[prefix] = counts.get(prefix, 0) + 1
        return counts


def family_adapter(family: str, unet: nn.Module, text_encoders: tuple, v_parameterization: bool = False):
    """The family adapter of ``family`` holding these models (not loaded through settings)."""
    from trainer.settings import TrainingSettings

    spec = family_spec(family)
    adapter = spec.adapter_class()(TrainingSettings(v_parameterization=v_parameterization, **spec.flags))
    adapter.unet, adapter.text_encoders = unet, tuple(text_encoders)
    return adapter


def lora_targets_of(adapter) -> list[LoraTarget]:
    """Every target a LoRA file of the adapter's family may name (a family that trains fewer than that by default,
    FLUX.1's T5, lists them all in ``all_lora_targets``)."""
    return getattr(adapter, "all_lora_targets", adapter.lora_targets)()


def base_modules(family: str, unet: nn.Module, text_encoders: tuple, with_conv: bool = True) -> BaseModules:
    """Every layer a LoRA of ``family`` can patch; ``with_conv`` adds the ResNet/sampler layers (LoCon)."""
    targets = lora_targets_of(family_adapter(family, unet, text_encoders))
    layers = _named_layers(targets, with_conv)
    unet_target = next(t for t in targets if t.prefix == "lora_unet")
    aliases = {}
    if unet_target.root is not unet:  # the family names a view of the UNet (SDXL: SGM names)
        plain = LoraTarget("lora_unet", unet, UNET_ATTENTION_CLASSES, unet_target.role, UNET_CONV_CLASSES)
        aliases = {n: layer for n, layer in _named_layers([plain], with_conv).items() if n not in layers}
    return BaseModules(family, layers, aliases)


def _named_layers(targets, with_conv: bool) -> dict[str, TargetLayer]:
    return {layer.lora_name: layer for target in targets for layer in find_target_layers(target, with_conv)}


# ---- models without weights (enough for names and shapes) ----------------------------------------

def empty_models(path) -> tuple[str, nn.Module, tuple]:
    """(family, unet, text encoders) of the model at ``path`` on the meta device: no weights read.

    Used to check a LoRA's keys against a base model in a second, even for SDXL.
    """
    from trainer.checkpoints import detect, infer_config_dir, resolve_model_path

    path = resolve_model_path(path)
    info = detect(path).require_usable()
    spec = spec_for_checkpoint(info.family)
    own = getattr(spec.adapter_class(), "empty_models", None)  # a family whose models are not SD components
    if own is not None:
        return (spec.key, *own(path))
    config_dir = path if info.format == "diffusers" else infer_config_dir(path)
    return (spec.key, *empty_models_from_configs(config_dir))


def empty_models_from_configs(config_dir) -> tuple[nn.Module, tuple]:
    """(unet, text encoders) on the meta device, from a diffusers (config) folder."""
    from trainer.models.components import empty_model

    index = json.loads((Path(config_dir) / "model_index.json").read_text())
    encoders = tuple(empty_model(config_dir, name) for name in TEXT_ENCODER_NAMES if name in index)
    return empty_model(config_dir, "unet"), encoders
