"""Key maps between diffusers/transformers state dicts and the original LDM/SGM single-file layout.

One map serves both directions: :func:`component_plan` lists, for every tensor
of a diffusers component, which single-file key holds it and how it is stored
(``copy``, ``conv1x1`` for VAE attention, ``qkv`` for OpenCLIP's merged
in-projection, ``transpose`` for OpenCLIP's text projection). Export applies the
plan forwards, loading applies it backwards. Maps are derived from the model's
own keys, so any block count, layers per block or attention placement works.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from trainer.checkpoints.layouts import SD1, SD2, SDXL


@dataclass(frozen=True)
class Entry:
    ldm: str  # key in the single file
    diffusers: tuple[str, ...]  # key(s) in the diffusers/transformers state dict
    kind: str = "copy"  # "copy" | "conv1x1" | "qkv" | "transpose"


# Single-file prefixes of each component, per layout.
LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip": "cond_stage_model.transformer.",  # + text_model.*
    "openclip": "cond_stage_model.model.",
    "sdxl_clip": "conditioner.embedders.0.transformer.",
    "sdxl_openclip": "conditioner.embedders.1.model.",
}

UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
UNET_RESNET = {
    "norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection.",
}
VAE_TOP_LEVEL = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
OPENCLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPENCLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
}

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.")


def _rename(suffix: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if suffix.startswith(old):
            return new + suffix[len(old):]
    return suffix


# ---- UNet ------------------------------------------------------------------------------

def unet_block_prefixes(keys) -> dict[str, str]:
    """Map each diffusers sub-module prefix (``down_blocks.0.resnets.1.``) to its LDM prefix."""
    parts = defaultdict(set)  # (side, block) -> {(kind, index)}
    mid = set()
    for key in keys:
        if m := _BLOCK.match(key):
            parts[(m[1], int(m[2]))].add((m[3], int(m[4])))
        elif m := _MID.match(key):
            mid.add((m[1], int(m[2])))
    prefixes: dict[str, str] = {}
    _down_prefixes(parts, prefixes)
    _up_prefixes(parts, prefixes)
    # LDM's middle_block interleaves resnet, attention, resnet.
    for kind, index in mid:
        position = 2 * index + (1 if kind == "attentions" else 0)
        prefixes[f"mid_block.{kind}.{index}."] = f"middle_block.{position}."
    return prefixes


def _blocks(parts, side: str) -> list[int]:
    return sorted(block for s, block in parts if s == side)


def _count(parts, side, block, kind) -> int:
    return len({i for k, i in parts[(side, block)] if k == kind})


def _down_prefixes(parts, prefixes) -> None:
    position = 1  # input_blocks.0 is conv_in
    for block in _blocks(parts, "down_blocks"):
        for j in range(_count(parts, "down_blocks", block, "resnets")):
            prefixes[f"down_blocks.{block}.resnets.{j}."] = f"input_blocks.{position}.0."
            prefixes[f"down_blocks.{block}.attentions.{j}."] = f"input_blocks.{position}.1."
            position += 1
        if _count(parts, "down_blocks", block, "downsamplers"):
            prefixes[f"down_blocks.{block}.downsamplers.0.conv."] = f"input_blocks.{position}.0.op."
            position += 1


def _up_prefixes(parts, prefixes) -> None:
    position = 0
    for block in _blocks(parts, "up_blocks"):
        has_attention = _count(parts, "up_blocks", block, "attentions") > 0
        for j in range(_count(parts, "up_blocks", block, "resnets")):
            prefixes[f"up_blocks.{block}.resnets.{j}."] = f"output_blocks.{position}.0."
            prefixes[f"up_blocks.{block}.attentions.{j}."] = f"output_blocks.{position}.1."
            position += 1
        if _count(parts, "up_blocks", block, "upsamplers"):
            slot = 2 if has_attention else 1  # the upsampler follows the attention when there is one
            prefixes[f"up_blocks.{block}.upsamplers.0."] = f"output_blocks.{position - 1}.{slot}."


def unet_plan(keys, prefix: str = LDM_PREFIXES["unet"]) -> list[Entry]:
    keys = list(keys)
    blocks = unet_block_prefixes(keys)
    plan = []
    for key in keys:
        ldm = _unet_key(key, blocks)
        if ldm is None:
            raise KeyError(f"no single-file name known for UNet tensor {key!r}")
        plan.append(Entry(prefix + ldm, (key,)))
    return plan


def _unet_key(key: str, blocks: dict[str, str]) -> str | None:
    for old, new in UNET_TOP_LEVEL.items():
        if key.startswith(old):
            return new + key[len(old):]
    for old in sorted(blocks, key=len, reverse=True):
        if key.startswith(old):
            suffix = key[len(old):]
            return blocks[old] + (_rename(suffix, UNET_RESNET) if ".resnets." in old else suffix)
    return None


# ---- VAE -------------------------------------------------------------------------------

def vae_plan(keys, prefix: str = LDM_PREFIXES["vae"]) -> list[Entry]:
    keys = list(keys)
    n_up = len({int(m[1]) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    return [_vae_entry(key, n_up, prefix) for key in keys]


def _vae_entry(key: str, n_up: int, prefix: str) -> Entry:
    ldm = _rename(key, VAE_TOP_LEVEL)
    ldm = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", ldm)
    ldm = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", ldm)
    ldm = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", ldm)
    ldm = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", ldm)
    ldm = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", ldm)
    kind = "copy"
    if ".mid_block.attentions.0." in ldm:
        head, suffix = ldm.split(".mid_block.attentions.0.")
        ldm = f"{head}.mid.attn_1." + _rename(suffix, VAE_ATTENTION)
        kind = "conv1x1" if suffix.endswith("weight") and not suffix.startswith("group_norm") else "copy"
    elif ".block." in ldm:
        head, _, suffix = ldm.rpartition(".block.")
        index, _, rest = suffix.partition(".")
        ldm = f"{head}.block.{index}." + _rename(rest, VAE_RESNET)
    elif ".mid.block_" in ldm:
        head, _, rest = ldm.partition(".mid.block_")
        index, _, suffix = rest.partition(".")
        ldm = f"{head}.mid.block_{index}." + _rename(suffix, VAE_RESNET)
    return Entry(prefix + ldm, (key,), kind)


# ---- text encoders ---------------------------------------------------------------------

def _strip_text_model(key: str) -> str:
    # transformers 5 CLIPTextModel keys have no "text_model." prefix; WithProjection keeps it.
    return key[len("text_model."):] if key.startswith("text_model.") else key


def clip_plan(keys, prefix: str) -> list[Entry]:
    """OpenAI CLIP (HF layout inside the file): ``<prefix>text_model.<key>``."""
    plan = []
    for key in keys:
        bare = _strip_text_model(key)
        if bare == "text_projection.weight":
            plan.append(Entry(prefix + "text_projection.weight", (key,)))
        else:
            plan.append(Entry(prefix + "text_model." + bare, (key,)))
    return plan


def openclip_plan(keys, prefix: str) -> list[Entry]:
    """OpenCLIP layout: merged q/k/v in-projection, ``resblocks``, transposed text projection."""
    keys = list(keys)
    by_bare = {_strip_text_model(k): k for k in keys}
    plan, used = [], set()
    for bare, key in by_bare.items():
        if bare in OPENCLIP_TOP_LEVEL:
            plan.append(Entry(prefix + OPENCLIP_TOP_LEVEL[bare], (key,)))
        elif bare == "text_projection.weight":
            plan.append(Entry(prefix + "text_projection", (key,), "transpose"))
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", bare):
            layer, what = m[1], m[2]
            group = tuple(by_bare[f"encoder.layers.{layer}.self_attn.{p}_proj.{what}"] for p in "qkv")
            plan.append(Entry(f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{what}", group, "qkv"))
            used.update(group)
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)$", bare):
            if re.match(r"self_attn\.[kv]_proj\.", m[2]):
                continue  # part of a q/k/v group
            renamed = _rename(m[2], OPENCLIP_LAYER)
            plan.append(Entry(f"{prefix}transformer.resblocks.{m[1]}.{renamed}", (key,)))
        else:
            raise KeyError(f"no OpenCLIP name known for text-encoder tensor {key!r}")
    return plan


# Other spellings found in real single files: key fragment -> alternative.
KEY_ALIASES = (
    (".transformer.text_model.", ".transformer."),  # early SD1 files without "text_model."
)


def key_candidates(ldm_key: str) -> list[str]:
    """``ldm_key`` and the alternative spellings it may have in a user's file."""
    return [ldm_key] + [ldm_key.replace(old, new) for old, new in KEY_ALIASES if old in ldm_key]


# ---- tensor transforms -----------------------------------------------------------------

def to_ldm(entry: Entry, tensors: list):
    """Combine the diffusers tensor(s) of ``entry`` into the single-file tensor."""
    import torch

    if entry.kind == "qkv":
        return torch.cat(tensors, dim=0)
    (tensor,) = tensors
    if entry.kind == "conv1x1":
        return tensor.reshape(*tensor.shape, 1, 1)
    if entry.kind == "transpose":
        return tensor.T.contiguous()
    return tensor


def from_ldm(entry: Entry, tensor) -> list:
    """Split/reshape a single-file tensor back into the diffusers tensor(s) of ``entry``."""
    if entry.kind == "qkv":
        return [t.contiguous() for t in tensor.chunk(3, dim=0)]
    if entry.kind == "conv1x1":
        return [tensor.reshape(tensor.shape[:2]) if tensor.dim() == 4 else tensor]
    if entry.kind == "transpose":
        return [tensor.T.contiguous()]
    return [tensor]


# layout -> diffusers component -> (single-file prefix, plan builder)
SINGLE_FILE_LAYOUTS = {
    SD1: {
        "unet": (LDM_PREFIXES["unet"], unet_plan),
        "vae": (LDM_PREFIXES["vae"], vae_plan),
        "text_encoder": (LDM_PREFIXES["clip"], clip_plan),
    },
    SD2: {
        "unet": (LDM_PREFIXES["unet"], unet_plan),
        "vae": (LDM_PREFIXES["vae"], vae_plan),
        "text_encoder": (LDM_PREFIXES["openclip"], openclip_plan),
    },
    SDXL: {
        "unet": (LDM_PREFIXES["unet"], unet_plan),
        "vae": (LDM_PREFIXES["vae"], vae_plan),
        "text_encoder": (LDM_PREFIXES["sdxl_clip"], clip_plan),
        "text_encoder_2": (LDM_PREFIXES["sdxl_openclip"], openclip_plan),
    },
}
