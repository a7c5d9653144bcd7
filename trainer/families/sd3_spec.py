"""The SD 3 / 3.5 family record (Medium, Large; torch-free; the adapter is in sd3.py).

Parameter counts are SD3 Medium's, counted on ``trainer.models.sd3.MMDiT`` built on the meta device with SAI's
architecture (24 joint blocks of width 1536, a 192x192 position table: 2,084,951,104 with the table; SD 3.5
Large 8,146,280,768, SD 3.5 Medium 2,469,663,936 — the check counts a real file's header instead), CLIP-L with
its projection 123,650,304, CLIP-G 694,659,840, T5-XXL's encoder 4,762,310,656, the 16-channel VAE 83,819,683.
LoRA sizes follow ``networks.lora_sd3``'s targets, every Linear of each ``SingleDiTBlock`` (x and context blocks:
adaLN_modulation.1 1536->9216, attn.qkv 1536->4608, attn.proj, mlp.fc1 1536->6144, mlp.fc2; the last context
block is pre-only: adaLN 1536->3072 and qkv): 1,671,168 per rank (SD 3.5 Large 4,212,224, 3.5 Medium 1,850,880);
CLIP-L's and CLIP-G's attention and MLP: 165,888 + 737,280.

Activations (GiB per 512x512 sample, bf16): 1024 image tokens plus 77 + 256 context tokens at width 1536. With
checkpointing each of the 24 blocks keeps its two inputs (24 x 1357 x 1536 x 2 bytes = 0.1 GB) plus one block
recomputed: 0.3. Without it every block keeps about 30 tensors of its width (its MLP's four times that): 3.5.
"""
from __future__ import annotations

from trainer.families.spec import DiffusionSchedule, FamilySpec

SD3_LAYOUT = "sd3"

SD3 = FamilySpec(
    "sd3", "Stable Diffusion 3", "SD 3", "trainer.families.sd3:SD3Family",
    flags={"v2": False, "sdxl": False, "flux1_checkbox": False, "sd3_checkbox": True},
    selecting_flags=("sd3_checkbox",),
    unet_params=2_084_951_104, text_encoder_params=(123_650_304, 694_659_840, 4_762_310_656), vae_params=83_819_683,
    unet_lora_per_rank=1_671_168, unet_conv_per_rank=0, text_encoder_lora_per_rank=903_168,
    activations_gib=3.5, checkpointed_activations_gib=0.3, native_resolution=1024,
    conditioning_width=4096, v_prediction_models=False, te_output_cache_setting="sd3_cache_text_encoder_outputs",
    schedule=DiffusionSchedule(num_train_timesteps=1000, beta_schedule="flow_matching"),
    checkpoint_layout=SD3_LAYOUT, lora_key_markers=("lora_unet_joint_blocks_",),
)
