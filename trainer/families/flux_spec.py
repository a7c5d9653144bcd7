"""The FLUX.1 family record (dev and schnell; torch-free; the adapter is in flux.py).

Parameter counts are FLUX.1 dev's (BFL's ``flux1-dev.safetensors``: 11,901,408,320; schnell has no
guidance embedder, 11.9 B too), CLIP-L's 123,060,480, T5-XXL's encoder 4,762,310,656 and the 16-channel
AE's 83,819,683. LoRA sizes follow ``networks.lora_flux``'s targets, every Linear of each
``DoubleStreamBlock`` (img/txt: mod.lin 3072->18432, attn.qkv 3072->9216, attn.proj, mlp.0 3072->12288,
mlp.2) and ``SingleStreamBlock`` (linear1 3072->21504, linear2 15360->3072, modulation.lin 3072->9216):
19 x 141,312 + 38 x 55,296 = 4,786,176 per rank (rank 16: 76.6 M parameters, 153 MB in bf16, the size of
a typical dim-16 FLUX LoRA). ``tests/test_flux_family.py`` recounts them on the real architecture.

Activations (GiB per 512x512 sample, bf16; the estimate scales them by pixels): a 512 px image is
1024 image tokens plus 512 T5 tokens at width 3072. Checkpointing keeps each of the 57 blocks' inputs
(57 x 1536 x 3072 x 2 bytes = 0.54 GB) plus one block recomputed: 0.8. Without it every block keeps about
25 tensors of its width: 13.

Beside sd-scripts' documented "12GB VRAM: use --blocks_to_swap 16 and 8bit AdamW" (with --fp8_base,
docs/flux_train_network.md 6.1): for that run (1024 px, batch 1, rank 16, cached text-encoder outputs)
Nekoya estimates about 17.8 GiB, its peak being the caption caching with the transformer on the GPU. The
step with sd-scripts' swap of 8 double and 16 single blocks (4.6 GiB of fp8 weights kept on the CPU) comes
to about 11.6 GiB by the same figures; Nekoya applies neither the swap nor the move of the transformer off the
GPU while captions are encoded yet (``tests/test_flux_preflight.py``).
"""
from __future__ import annotations

from trainer.families.spec import DiffusionSchedule, FamilySpec

FLUX_LAYOUT = "flux1"
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38

FLUX1 = FamilySpec(
    "flux1", "FLUX.1", "FLUX.1", "trainer.families.flux:FluxFamily",
    flags={"v2": False, "sdxl": False, "flux1_checkbox": True, "sd3_checkbox": False}, selecting_flags=("flux1_checkbox",),
    unet_params=11_901_408_320, text_encoder_params=(123_060_480, 4_762_310_656), vae_params=83_819_683,
    unet_lora_per_rank=4_786_176, unet_conv_per_rank=0, text_encoder_lora_per_rank=165_888,
    activations_gib=13.0, checkpointed_activations_gib=0.8, native_resolution=1024,
    conditioning_width=4096, v_prediction_models=False, te_output_cache_setting="flux1_cache_text_encoder_outputs",
    schedule=DiffusionSchedule(num_train_timesteps=1000, beta_schedule="flow_matching"),
    checkpoint_layout=FLUX_LAYOUT, lora_key_markers=("lora_unet_double_blocks_", "lora_unet_single_blocks_"),
    text_encoder_file_settings=("clip_l", "t5xxl"), vae_file_setting="ae",
)
