"""SD3's memory figures recounted on the real architectures, the model-size count of SD3 files and folders, and the
estimate of a typical run."""
from __future__ import annotations

import math

import torch

from sd3_support import tiny_sd3_dir, tiny_sd3_files  # noqa: F401  (fixtures)
from trainer.families.sd3_spec import SD3
from trainer.preflight.device import GIB, DeviceInfo
from trainer.preflight.memory import estimate_memory
from trainer.preflight.model_size import model_size
from trainer.settings import TrainingSettings


def _lora_per_rank(root: torch.nn.Module, classes: tuple[str, ...]) -> int:
    return sum(m.in_features + m.out_features for block in root.modules() if type(block).__name__ in classes
               for m in block.modules() if isinstance(m, torch.nn.Linear))


def test_spec_figures_are_sd3_mediums_counted_on_the_architecture():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from trainer.models.sd3 import MMDiT, MMDiTConfig

    with torch.device("meta"):
        mmdit = MMDiT(MMDiTConfig())  # SAI's SD3 Medium: 24 joint blocks of 1536, a 192x192 position table
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                            num_attention_heads=12, projection_dim=768))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            projection_dim=1280))
    assert SD3.unet_params == sum(p.numel() for p in mmdit.parameters()) + mmdit.pos_embed.numel()
    assert SD3.unet_lora_per_rank == _lora_per_rank(mmdit, ("SingleDiTBlock",))
    assert SD3.text_encoder_params[:2] == tuple(sum(p.numel() for p in m.parameters()) for m in (clip_l, clip_g))
    assert SD3.text_encoder_lora_per_rank == sum(_lora_per_rank(m, ("CLIPAttention", "CLIPMLP")) for m in (clip_l, clip_g))


def test_model_size_counts_the_mmdit_of_a_sai_file_and_every_encoder_of_a_folder(tiny_sd3_dir, tiny_sd3_files):
    from safetensors import safe_open

    with safe_open(str(tiny_sd3_files["full"]), "pt") as f:
        mmdit = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.diffusion_model."))
    assert model_size(str(tiny_sd3_files["full"]), SD3).unet == mmdit
    assert model_size(str(tiny_sd3_files["bare"]), SD3).unet == mmdit
    folder = model_size(str(tiny_sd3_dir), SD3)
    assert folder.unet == mmdit and len(folder.text_encoders) == 3  # CLIP-L, CLIP-G and T5-XXL


def test_the_estimate_of_a_1024_px_run_holds_every_part():
    settings = TrainingSettings(
        sd3_checkbox=True, LoRA_type="Standard", pretrained_model_name_or_path="/nowhere/sd3_medium.safetensors",
        max_resolution="1024,1024", train_batch_size=1, gradient_checkpointing=True, optimizer="AdamW8bit",
        network_dim=16, network_alpha=16, mixed_precision="bf16", cache_latents=True, unet_lr=1e-4, text_encoder_lr=0,
        sd3_cache_text_encoder_outputs=True)
    card = DeviceInfo("cuda", "24 GB GPU", 24 * GIB, 24 * GIB, "test")
    estimate = estimate_memory(settings, SD3, card)
    parts = {name: size / GIB for name, size in estimate.parts.items()}
    assert parts["base model"] >= 2 * (SD3.unet_params + SD3.vae_params) / GIB * 0.99
    assert not estimate.exceeds_device and estimate.total_bytes / GIB < 24
