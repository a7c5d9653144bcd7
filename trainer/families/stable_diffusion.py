"""The Stable Diffusion 1.x, 2.x and XL family records (torch-free; the adapters are in sd.py, sdxl.py).

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

from trainer.families.spec import FamilySpec
from trainer.families.tiny_models import TINY_SD1, TINY_SD2, TINY_SD2V, TINY_SDXL

# the built-in families are keyed by the checkpoint layout each loads (trainer.checkpoints.layouts reads it here)
SD1 = FamilySpec(
    "sd1", "Stable Diffusion 1.x", "SD 1.x", "trainer.families.sd:SD1Family",
    flags={"v2": False, "sdxl": False, "flux1_checkbox": False, "sd3_checkbox": False}, selecting_flags=("v2", "sdxl"),
    unet_params=859_520_964, text_encoder_params=(123_060_480,), vae_params=83_653_863,
    unet_lora_per_rank=423_936, unet_conv_per_rank=544_000, text_encoder_lora_per_rank=165_888,
    activations_gib=1.2, checkpointed_activations_gib=0.2, native_resolution=512,
    conditioning_width=768, v_prediction_models=False, tiny=TINY_SD1,
)
SD2 = FamilySpec(
    "sd2", "Stable Diffusion 2.x", "SD 2.x", "trainer.families.sd:SD2Family",
    flags={"v2": True, "sdxl": False, "flux1_checkbox": False, "sd3_checkbox": False}, selecting_flags=("v2", "sdxl"),
    unet_params=865_910_724, text_encoder_params=(340_387_840,), vae_params=83_653_863,
    unet_lora_per_rank=432_128, unet_conv_per_rank=544_000, text_encoder_lora_per_rank=423_936,
    activations_gib=1.2, checkpointed_activations_gib=0.2, native_resolution=768,
    conditioning_width=1024, files_tell_prediction=False,
    tiny=TINY_SD2, tiny_variants={"sd2v": TINY_SD2V},
)
SDXL = FamilySpec(
    "sdxl", "Stable Diffusion XL", "SDXL", "trainer.families.sdxl:SDXLFamily",
    flags={"v2": False, "sdxl": True, "flux1_checkbox": False, "sd3_checkbox": False}, selecting_flags=("sdxl",),
    unet_params=2_567_463_684, text_encoder_params=(123_060_480, 694_659_840), vae_params=83_653_863,
    unet_lora_per_rank=2_659_840, unet_conv_per_rank=355_840, text_encoder_lora_per_rank=903_168,
    activations_gib=1.95, checkpointed_activations_gib=0.26, native_resolution=1024,
    conditioning_width=2048, sgm_lora_names=True, te_output_cache_setting="sdxl_cache_text_encoder_outputs",
    fp16_vae_overflows=True, tiny=TINY_SDXL,
)
STABLE_DIFFUSION_SPECS = (SD1, SD2, SDXL)
