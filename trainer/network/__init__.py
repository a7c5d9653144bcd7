"""LoRA network: modules, sd-scripts key naming, weights files and file metadata."""
from .module import LoRAModule
from .network import NETWORK_TYPES, LoRANetwork, NetworkConfigError, NetworkSpec
from .targets import CLIP_CLASSES, UNET_ATTENTION_CLASSES, UNET_CONV_CLASSES, LayerKind, LoraTarget, Role, find_target_layers

__all__ = [
    "LoRAModule", "NETWORK_TYPES", "LoRANetwork", "NetworkConfigError", "NetworkSpec", "CLIP_CLASSES",
    "UNET_ATTENTION_CLASSES", "UNET_CONV_CLASSES", "LayerKind", "LoraTarget", "Role", "find_target_layers",
]
