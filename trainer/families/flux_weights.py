"""FLUX transformer weights: BFL's key layout from a diffusers folder, and the architecture from a file's shapes.

BFL files (``flux1-dev.safetensors``, kohya_ss users' files, ComfyUI's) load into
``trainer.models.flux.Flux`` as they are. A diffusers folder's ``FluxTransformer2DModel`` weights
are turned into BFL keys here: diffusers splits BFL's fused Linears (``img_attn.qkv`` into
to_q/to_k/to_v, single blocks' ``linear1`` into to_q/to_k/to_v/proj_mlp), so they are concatenated
back in that order. diffusers' own converter (``convert_flux_transformer_checkpoint_to_diffusers``)
goes the other way only and assumes FLUX.1's full width (3072); ``tests/test_flux_model.py`` checks
that this map is its inverse at that width.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from trainer.models.flux import FluxConfig, axes_dim_for

# diffusers name -> BFL name, for one-to-one tensors (".weight"/".bias" appended)
_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """diffusers' final norm gives (scale, shift); BFL's adaLN_modulation gives (shift, scale)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _count(keys, prefix: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def diffusers_to_bfl(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in BFL's keys (every tensor used, or KeyError)."""
    src = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def move(d_name: str, b_name: str, params=("weight", "bias")) -> None:
        for param in params:
            if f"{d_name}.{param}" in src:
                out[f"{b_name}.{param}"] = src.pop(f"{d_name}.{param}")

    def fuse(d_names, b_name: str) -> None:
        for param in ("weight", "bias"):
            parts = [f"{n}.{param}" for n in d_names]
            if all(p in src for p in parts):
                out[f"{b_name}.{param}"] = torch.cat([src.pop(p) for p in parts], dim=0)

    for d_name, b_name in _GLOBAL.items():
        move(d_name, b_name)
    for param in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{param}"] = swap_halves(src.pop(f"norm_out.linear.{param}"))
    for i in range(_count(sd, "transformer_blocks.")):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for d_name, b_name in _DOUBLE.items():
            move(d + d_name, b + b_name)
        for d_name, b_name in _DOUBLE_NORMS.items():
            out[b + b_name + ".scale"] = src.pop(d + d_name + ".weight")
        for b_name, d_names in _DOUBLE_FUSED.items():
            fuse([d + n for n in d_names], b + b_name)
    for i in range(_count(sd, "single_transformer_blocks.")):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for d_name, b_name in _SINGLE.items():
            move(d + d_name, b + b_name)
        for d_name, b_name in _SINGLE_NORMS.items():
            out[b + b_name + ".scale"] = src.pop(d + d_name + ".weight")
        for b_name, d_names in _SINGLE_FUSED.items():
            fuse([d + n for n in d_names], b + b_name)
    if src:
        raise KeyError(f"diffusers FLUX weights not mapped to BFL keys: {sorted(src)[:5]}")
    return out


def config_from_bfl_shapes(shapes: Mapping[str, tuple]) -> FluxConfig:
    """The architecture of a BFL-layout state dict (its keys and shapes; no weights needed)."""
    hidden, in_channels = shapes["img_in.weight"]
    norm = "double_blocks.0.img_attn.norm.query_norm.scale"
    head_dim = shapes[norm][0] if norm in shapes else shapes["single_blocks.0.norm.query_norm.scale"][0]
    mlp = shapes["double_blocks.0.img_mlp.0.weight"][0] if "double_blocks.0.img_mlp.0.weight" in shapes \
        else shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
    return FluxConfig(
        in_channels=in_channels, vec_in_dim=shapes["vector_in.in_layer.weight"][1],
        context_in_dim=shapes["txt_in.weight"][1], hidden_size=hidden, mlp_ratio=mlp / hidden,
        num_heads=hidden // head_dim, depth=_count(shapes, "double_blocks."),
        depth_single_blocks=_count(shapes, "single_blocks."), axes_dim=axes_dim_for(head_dim),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes or not _count(shapes, "double_blocks."),
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def config_from_diffusers(config: Mapping) -> FluxConfig:
    """A diffusers FluxTransformer2DModel config.json as the BFL model's config."""
    heads, head_dim = int(config.get("num_attention_heads", 24)), int(config.get("attention_head_dim", 128))
    return FluxConfig(
        in_channels=int(config.get("in_channels", 64)), vec_in_dim=int(config.get("pooled_projection_dim", 768)),
        context_in_dim=int(config.get("joint_attention_dim", 4096)), hidden_size=heads * head_dim,
        num_heads=heads, depth=int(config.get("num_layers", 19)),
        depth_single_blocks=int(config.get("num_single_layers", 38)),
        axes_dim=tuple(config.get("axes_dims_rope", axes_dim_for(head_dim))),
        guidance_embed=bool(config.get("guidance_embeds", False)),
    )


def strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL weights as some full checkpoints store them (``model.diffusion_model.`` in front)."""
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd
