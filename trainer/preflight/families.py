"""What preflight needs to know about each model family, as one table.

Parameter counts and LoRA sizes were counted on the real architectures built
from the shipped config folders (``trainer/checkpoints/configs``) on the meta
device, with sd-scripts' target rules (every Linear / 1x1 conv inside
``Transformer2DModel`` for the UNet, ``CLIPAttention``/``CLIPMLP`` for the text
encoders, 3x3 convs of ``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` for LoCon).
A LoRA on a layer of ``in`` inputs and ``out`` outputs has ``rank * (in + out)``
parameters, so each family stores the sum of ``in + out`` over its targets.
(Check: SD1.5 at rank 32 gives 18.9 M parameters = 37.7 MB in fp16, the size of a
typical dim-32 SD1.5 LoRA.)

Activation figures are GiB of UNet activations kept for the backward pass per
sample of 64x64 latents (512x512 px), half precision, SDPA attention: without
gradient checkpointing, and with it (only the blocks' inputs are kept; one block
is recomputed at a time). They are the tensor peaks of Nekoya's own training step
measured by ``bench/memory_peak.py`` in the GPU's dtypes (bf16 weights and
autocast, norms in fp32 as CUDA's autocast runs them), less the LoRA's gradients
and optimizer state, rounded up: SD1.5 1.19 / 0.17 GiB at 512 px, SD2.1 2.6 / 0.39
GiB at 768 px (1.17 / 0.175 per 512x512), SDXL 7.8 / 1.0 GiB at 1024 px
(bench/RESULTS.md, session 5). They agree with public reports
(SDXL LoRA in 8 GB with checkpointing, sd-scripts' train_SDXL-en; about 19 GB
without it, sd-scripts #756).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyTraits:
    name: str
    label: str
    unet_params: int
    text_encoder_params: tuple[int, ...]
    vae_params: int
    unet_lora_per_rank: int  # sum of (in + out) over the UNet's linear targets
    unet_conv_per_rank: int  # sum of (in * 9 + out) over the 3x3 conv targets (LoCon)
    text_encoder_lora_per_rank: int  # all text encoders together
    activations_gib: float  # per 512x512 sample, half precision, no gradient checkpointing
    checkpointed_activations_gib: float  # the same with gradient checkpointing
    native_resolution: int
    # Settings that only mean something for this family (others ignore them).
    te_output_cache_setting: str | None = None
    fp16_vae_overflows: bool = False  # the VAE gives NaN in fp16 (needs the no-half-VAE setting)


FAMILIES: dict[str, FamilyTraits] = {
    "sd1": FamilyTraits(
        "sd1", "Stable Diffusion 1.x", 859_520_964, (123_060_480,), 83_653_863,
        unet_lora_per_rank=423_936, unet_conv_per_rank=544_000, text_encoder_lora_per_rank=165_888,
        activations_gib=1.2, checkpointed_activations_gib=0.2, native_resolution=512,
    ),
    "sd2": FamilyTraits(
        "sd2", "Stable Diffusion 2.x", 865_910_724, (340_387_840,), 83_653_863,
        unet_lora_per_rank=432_128, unet_conv_per_rank=544_000, text_encoder_lora_per_rank=423_936,
        activations_gib=1.2, checkpointed_activations_gib=0.2, native_resolution=768,
    ),
    "sdxl": FamilyTraits(
        "sdxl", "Stable Diffusion XL", 2_567_463_684, (123_060_480, 694_659_840), 83_653_863,
        unet_lora_per_rank=2_659_840, unet_conv_per_rank=355_840, text_encoder_lora_per_rank=903_168,
        activations_gib=1.95, checkpointed_activations_gib=0.26, native_resolution=1024,
        te_output_cache_setting="sdxl_cache_text_encoder_outputs", fp16_vae_overflows=True,
    ),
}

# (v2, sdxl) ticked in the settings -> family; sdxl wins, as in kohya_ss.
_FLAGS_TO_FAMILY = {(False, False): "sd1", (True, False): "sd2", (False, True): "sdxl", (True, True): "sdxl"}

# The settings that choose each family, for messages ("tick v2").
FAMILY_FLAGS: dict[str, dict[str, bool]] = {
    "sd1": {"v2": False, "sdxl": False},
    "sd2": {"v2": True, "sdxl": False},
    "sdxl": {"v2": False, "sdxl": True},
}


def family_from_settings(settings) -> str:
    return _FLAGS_TO_FAMILY[(bool(settings.v2), bool(settings.sdxl))]


def traits_for(settings) -> FamilyTraits:
    return FAMILIES[family_from_settings(settings)]
