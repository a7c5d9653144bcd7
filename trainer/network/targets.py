"""Which layers get a LoRA and what they are called: sd-scripts' rules, as data.

A family adapter describes each root model as a ``LoraTarget`` (key prefix, root
module, target class names). Every Linear/Conv2d inside a module of a target class
gets a LoRA named ``<prefix>.<path to target>.<child path>`` with dots turned into
underscores, e.g. ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch import nn

UNET_ATTENTION_CLASSES = ("Transformer2DModel",)
UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
CLIP_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


class Role(str, Enum):
    """Which optimizer group a LoRA belongs to (and which learning rate it gets)."""

    UNET = "unet"
    TEXT_ENCODER = "textencoder"


class LayerKind(str, Enum):
    """Linear and 1x1 convs use network_dim/alpha; larger kernels use conv_dim/alpha."""

    LINEAR = "linear"
    CONV = "conv"


@dataclass(frozen=True)
class LoraTarget:
    prefix: str  # "lora_unet", "lora_te", "lora_te1", ...
    root: nn.Module
    classes: tuple[str, ...]
    role: Role
    # Extra classes scanned only when conv LoRA is on (LoCon / conv_dim), or when
    # the ranks come from a weights file: their Linear/1x1 children get network_dim.
    conv_classes: tuple[str, ...] = ()
    # Module path prefix the key must carry although the module tree lacks it:
    # transformers 5's CLIPTextModel has no ``text_model`` level, sd-scripts' keys do.
    path_prefix: str = ""


@dataclass(frozen=True)
class TargetLayer:
    lora_name: str
    module: nn.Module
    kind: LayerKind
    role: Role


def layer_kind(module: nn.Module) -> LayerKind | None:
    if isinstance(module, nn.Linear):
        return LayerKind.LINEAR
    if isinstance(module, nn.Conv2d):
        return LayerKind.LINEAR if tuple(module.kernel_size) == (1, 1) else LayerKind.CONV
    return None


def find_target_layers(target: LoraTarget, with_conv: bool) -> list[TargetLayer]:
    """Every layer of ``target`` that can carry a LoRA, in module order, uniquely named."""
    classes = target.classes + (target.conv_classes if with_conv else ())
    layers: list[TargetLayer] = []
    seen: set[str] = set()
    for path, module in target.root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_path, child in module.named_modules():
            kind = layer_kind(child)
            if kind is None:
                continue
            name = lora_name(target.prefix, target.path_prefix + path, child_path)
            if name in seen:
                raise ValueError(f"two layers map to the LoRA name {name}")
            seen.add(name)
            layers.append(TargetLayer(name, child, kind, target.role))
    return layers


def lora_name(prefix: str, module_path: str, child_path: str) -> str:
    return ".".join(p for p in (prefix, module_path, child_path) if p).replace(".", "_")
