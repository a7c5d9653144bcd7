"""SD3 transformer weights: SAI's key layout from a diffusers folder, and the architecture from a file's shapes.

SAI files (``sd3_medium.safetensors``, ``sd3.5_large.safetensors``, kohya_ss users' and ComfyUI's) load into
``trainer.models.sd3.MMDiT`` as they are (``model.diffusion_model.`` stripped). A diffusers folder's
``SD3Transformer2DModel`` weights are turned into SAI keys here: diffusers splits the fused ``attn.qkv`` into
to_q/to_k/to_v (``add_*_proj`` for the context stream) and stores the final norms' (shift, scale) as
(scale, shift), so they are concatenated and swapped back. diffusers' own converter
(``convert_sd3_transformer_checkpoint_to_diffusers``) goes the other way only; ``tests/test_sd3_family.py``
checks that this map is its inverse.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from trainer.models.sd3 import MMDiTConfig

SAI_PREFIX = "model.diffusion_model."
_GLOBAL = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
_BLOCK_NORMS = {
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
}
_BLOCK_FUSED = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """diffusers' continuous AdaLayerNorm gives (scale, shift); SAI's adaLN_modulation gives (shift, scale)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def count_blocks(keys, prefix: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def diffusers_to_sai(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel state dict in SAI's MMDiT keys (every tensor used, or KeyError)."""
    src = dict(sd)
    out: dict[str, torch.Tensor] = {"pos_embed": src.pop("pos_embed.pos_embed")}

    def move(d_name: str, s_name: str, params=("weight", "bias")) -> None:
        for param in params:
            if f"{d_name}.{param}" in src:
                out[f"{s_name}.{param}"] = src.pop(f"{d_name}.{param}")

    for d_name, s_name in _GLOBAL.items():
        move(d_name, s_name)
    for param in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{param}"] = swap_halves(src.pop(f"norm_out.linear.{param}"))
    depth = count_blocks(sd, "transformer_blocks.")
    for i in range(depth):
        d, s = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for d_name, s_name in {**_BLOCK, **_BLOCK_NORMS}.items():
            move(d + d_name, s + s_name)
        for s_name, d_names in _BLOCK_FUSED.items():
            for param in ("weight", "bias"):
                parts = [f"{d}{n}.{param}" for n in d_names]
                if all(p in src for p in parts):
                    out[f"{s}{s_name}.{param}"] = torch.cat([src.pop(p) for p in parts], dim=0)
        last = i == depth - 1  # the last context block is pre-only: its (scale, shift) norm is swapped too
        for param in ("weight", "bias"):
            weight = src.pop(f"{d}norm1_context.linear.{param}")
            out[f"{s}context_block.adaLN_modulation.1.{param}"] = swap_halves(weight) if last else weight
    if src:
        raise KeyError(f"diffusers SD3 weights not mapped to SAI keys: {sorted(src)[:5]}")
    return out


def config_from_sai_shapes(shapes: Mapping[str, tuple]) -> MMDiTConfig:
    """The architecture of a SAI-layout MMDiT state dict (its keys and shapes; no weights needed)."""
    hidden, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    depth = count_blocks(shapes, "joint_blocks.")
    qk_norm = "rms" if "joint_blocks.0.x_block.attn.ln_q.weight" in shapes else None
    head_dim = shapes["joint_blocks.0.x_block.attn.ln_q.weight"][0] if qk_norm else 64  # SAI: 64 per head
    self_attn = tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes)
    return MMDiTConfig(
        depth=depth, hidden_size=hidden, num_heads=max(1, hidden // head_dim), patch_size=patch,
        in_channels=in_channels, out_channels=shapes["final_layer.linear.weight"][0] // (patch * patch),
        pos_embed_max_size=int(round(shapes["pos_embed"][1] ** 0.5)), adm_in_channels=shapes["y_embedder.mlp.0.weight"][1],
        context_in_dim=shapes["context_embedder.weight"][1],
        mlp_ratio=shapes["joint_blocks.0.x_block.mlp.fc1.weight"][0] / hidden, qk_norm=qk_norm,
        x_block_self_attn_layers=self_attn,
    )


def config_from_diffusers(config: Mapping) -> MMDiTConfig:
    """A diffusers SD3Transformer2DModel config.json as the SAI model's config."""
    heads, head_dim = int(config.get("num_attention_heads", 18)), int(config.get("attention_head_dim", 64))
    qk_norm = config.get("qk_norm")
    return MMDiTConfig(
        depth=int(config.get("num_layers", 18)), hidden_size=heads * head_dim, num_heads=heads,
        patch_size=int(config.get("patch_size", 2)), in_channels=int(config.get("in_channels", 16)),
        out_channels=int(config.get("out_channels") or config.get("in_channels", 16)),
        pos_embed_max_size=int(config.get("pos_embed_max_size", 96)),
        adm_in_channels=int(config.get("pooled_projection_dim", 2048)),
        context_in_dim=int(config.get("joint_attention_dim", 4096)),
        qk_norm="rms" if qk_norm == "rms_norm" else None,
        x_block_self_attn_layers=tuple(config.get("dual_attention_layers") or ()),
    )


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str = SAI_PREFIX) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` without it (a SAI checkpoint's transformer, or one text encoder)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
