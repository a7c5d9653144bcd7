"""Architectures of the tiny random test models, declared by the family specs (``FamilySpec.tiny``).

Each one mirrors the *shape conventions* of its real family (attention layout,
linear projections, text-encoder activation and padding, prediction type) at a
size that trains in milliseconds on a CPU. Head counts follow the rules that
:mod:`trainer.checkpoints.infer` uses to re-infer an architecture from tensor
shapes: UNet SD1 has 8 heads per block, SD2/SDXL 64-dim heads (at least one);
text encoders have 64-dim heads, or 8-dim heads below 64 channels.
:mod:`trainer.devtools.synthetic` builds them; torch-free like the specs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

END, BANG = "<|endoftext|>", "!"

TINY_VAE = {
    "block_out_channels": [32, 32, 32, 32],  # 4 blocks: 8x downsampling like the real VAE
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
}

_SD_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "sample_size": 8,
}


def _text_encoder(act: str, *, projection: bool = False, pad_id: int = 522, hidden: int = 32, heads: int = 4) -> dict:
    return {
        "class": "CLIPTextModelWithProjection" if projection else "CLIPTextModel",
        "vocab_size": 523,
        "hidden_size": hidden,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "projection_dim": hidden,
        "hidden_act": act,
        "bos_token_id": 521,
        "eos_token_id": 522,
        "pad_token_id": pad_id,
    }


@dataclass(frozen=True)
class TinySpec:
    pipeline_class: str  # diffusers pipeline class name
    unet: dict
    text_encoders: tuple[dict, ...]
    tokenizer_pads: tuple[str, ...]  # one pad token per tokenizer
    scheduler_config: str  # shipped config folder whose scheduler the tiny model copies
    vae: dict = field(default_factory=lambda: dict(TINY_VAE))
    # real architectures of this model (random weights, benchmarks only): size name -> shipped config folder
    full_sizes: Mapping[str, str] = field(default_factory=dict)


TINY_SD1 = TinySpec(
    pipeline_class="StableDiffusionPipeline",
    unet={**_SD_UNET, "attention_head_dim": 8},
    text_encoders=(_text_encoder("quick_gelu"),),
    tokenizer_pads=(END,),
    scheduler_config="sd15",
    full_sizes={"sd15": "sd15"},
)
TINY_SD2 = TinySpec(
    pipeline_class="StableDiffusionPipeline",
    unet={**_SD_UNET, "attention_head_dim": [1, 1], "use_linear_projection": True},
    text_encoders=(_text_encoder("gelu", pad_id=0),),
    tokenizer_pads=(BANG,),
    scheduler_config="sd21_base",
)
# SD2 768-v: the same tensors, a v-prediction scheduler
TINY_SD2V = replace(TINY_SD2, scheduler_config="sd21", full_sizes={"sd21": "sd21"})
TINY_SDXL = TinySpec(
    pipeline_class="StableDiffusionXLPipeline",
    unet={
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2],
        "attention_head_dim": [1, 1],
        "use_linear_projection": True,
        "cross_attention_dim": 32 + 64,  # te1 hidden + te2 hidden
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        # pooled te2 projection (64) + 6 micro-conditioning values x 8
        "projection_class_embeddings_input_dim": 64 + 6 * 8,
        "sample_size": 8,
    },
    text_encoders=(
        _text_encoder("quick_gelu"),
        _text_encoder("gelu", projection=True, pad_id=0, hidden=64, heads=1),
    ),
    tokenizer_pads=(END, BANG),
    scheduler_config="sdxl_base",
    vae={**TINY_VAE, "scaling_factor": 0.13025},
    full_sizes={"sdxl": "sdxl_base"},
)
