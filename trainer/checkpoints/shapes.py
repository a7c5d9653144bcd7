"""Read an SD architecture from the tensor shapes of a single-file checkpoint.

Only what shapes reveal is returned (as config overrides); everything else
comes from the family's official config. Head counts are not stored in
weights, so they follow the families' conventions: SD1 UNets use 8 heads,
SD2/SDXL UNets 64-dim heads; CLIP text encoders 64-dim heads (8-dim below 64
channels, which only test models have).
"""
from __future__ import annotations

import re

from trainer.checkpoints.errors import CheckpointError
from trainer.checkpoints.layouts import SD1, SD2
from trainer.checkpoints.ldm_keys import LDM_PREFIXES, SINGLE_FILE_LAYOUTS

# Text encoders whose single-file layout stores one more layer than diffusers uses (SD2 takes the penultimate).
DROPPED_FINAL_LAYER = {(SD2, "text_encoder"): 1}
SD1_UNET_HEADS = 8


def infer_components(shapes: dict[str, tuple], family: str) -> dict[str, dict]:
    """diffusers component name -> config values read from ``shapes``."""
    configs = {}
    for component, (prefix, plan) in SINGLE_FILE_LAYOUTS[family].items():
        if component == "unet":
            configs[component] = infer_unet(shapes, prefix, family)
        elif component == "vae":
            configs[component] = infer_vae(shapes, prefix)
        else:
            dropped = DROPPED_FINAL_LAYER.get((family, component), 0)
            reader = infer_openclip if prefix.endswith(".model.") else infer_clip
            configs[component] = reader(shapes, prefix, dropped)
    if "label_emb.0.0.weight" in _strip(shapes, LDM_PREFIXES["unet"]) and "text_encoder_2" in configs:
        projection_in = configs["unet"]["projection_class_embeddings_input_dim"]
        # text_time conditioning = pooled text embedding + 6 size/crop values, each time-embedded
        configs["unet"]["addition_time_embed_dim"] = (projection_in - configs["text_encoder_2"]["projection_dim"]) // 6
    return configs


def _strip(shapes: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _indices(keys, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := regex.match(k))})


def unet_heads(family: str, channels: list[int]):
    if family == SD1:
        return SD1_UNET_HEADS
    return [max(1, c // 64) for c in channels]


def text_heads(hidden: int) -> int:
    return hidden // 64 if hidden >= 64 else max(1, hidden // 8)


# ---- UNet ------------------------------------------------------------------------------------

def infer_unet(shapes: dict, prefix: str, family: str) -> dict:
    s = _strip(shapes, prefix)
    blocks = _down_blocks(s)
    layers = {len(b["resnets"]) for b in blocks}
    if len(layers) != 1:
        raise CheckpointError(f"unsupported UNet: blocks have different layer counts {sorted(layers)}")
    channels = [b["channels"] for b in blocks]
    has_attention = [b["depth"] > 0 for b in blocks]
    mid_depth = len(_indices(s, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if not mid_depth:
        raise CheckpointError("unsupported UNet: the middle block has no attention")
    depths = [b["depth"] or 1 for b in blocks]
    if not has_attention[-1]:
        depths[-1] = mid_depth  # diffusers takes the middle block's depth from the last entry
    elif depths[-1] != mid_depth:
        raise CheckpointError("unsupported UNet: middle block depth differs from the last down block")
    attn2 = next(k for k in s if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in s if k.endswith(".proj_in.weight"))
    config = {
        "in_channels": s["input_blocks.0.0.weight"][1],
        "out_channels": s["out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": layers.pop(),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
        "cross_attention_dim": s[attn2][1],
        "attention_head_dim": unet_heads(family, channels),
        "use_linear_projection": len(s[proj_in]) == 2,
        "transformer_layers_per_block": depths if len(set(depths)) > 1 else depths[0],
    }
    if "label_emb.0.0.weight" in s:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = s["label_emb.0.0.weight"][1]
    return config


def _down_blocks(s: dict) -> list[dict]:
    """Walk LDM input_blocks: resnets (+ attention) until a downsampler closes a block."""
    blocks, current = [], {"resnets": [], "depth": 0}
    for index in _indices(s, r"input_blocks\.(\d+)\.")[1:]:  # 0 is conv_in
        if f"input_blocks.{index}.0.op.weight" in s:
            blocks.append(current)
            current = {"resnets": [], "depth": 0}
            continue
        current["resnets"].append(index)
        current["channels"] = s[f"input_blocks.{index}.0.out_layers.3.weight"][0]
        depth = len(_indices(s, rf"input_blocks\.{index}\.1\.transformer_blocks\.(\d+)\."))
        current["depth"] = max(current["depth"], depth)
    blocks.append(current)
    return blocks


# ---- VAE -------------------------------------------------------------------------------------

def infer_vae(shapes: dict, prefix: str) -> dict:
    s = _strip(shapes, prefix)
    levels = _indices(s, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise CheckpointError("the file has no VAE encoder weights")
    return {
        "in_channels": s["encoder.conv_in.weight"][1],
        "out_channels": s["decoder.conv_out.weight"][0],
        "latent_channels": s["post_quant_conv.weight"][0],
        "block_out_channels": [s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels],
        "layers_per_block": len(_indices(s, r"encoder\.down\.0\.block\.(\d+)\.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
    }


# ---- text encoders ---------------------------------------------------------------------------

def infer_clip(shapes: dict, prefix: str, dropped_layers: int = 0) -> dict:
    s = _strip(shapes, prefix)
    if not any(k.startswith("text_model.") for k in s):  # some old files omit "text_model."
        s = {"text_model." + k: v for k, v in s.items()}
    vocab, hidden = s["text_model.embeddings.token_embedding.weight"]
    config = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "max_position_embeddings": s["text_model.embeddings.position_embedding.weight"][0],
        "num_hidden_layers": len(_indices(s, r"text_model\.encoder\.layers\.(\d+)\.")) - dropped_layers,
        "intermediate_size": s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "num_attention_heads": text_heads(hidden),
    }
    if "text_projection.weight" in s:
        config["projection_dim"] = s["text_projection.weight"][0]
    return config


def infer_openclip(shapes: dict, prefix: str, dropped_layers: int = 0) -> dict:
    s = _strip(shapes, prefix)
    vocab, hidden = s["token_embedding.weight"]
    config = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "max_position_embeddings": s["positional_embedding"][0],
        "num_hidden_layers": len(_indices(s, r"transformer\.resblocks\.(\d+)\.")) - dropped_layers,
        "intermediate_size": s["transformer.resblocks.0.mlp.c_fc.weight"][0],
        "num_attention_heads": text_heads(hidden),
    }
    if "text_projection" in s and not dropped_layers:  # SD2's projection is unused by diffusers
        config["projection_dim"] = s["text_projection"][1]
    return config


# ---- comparison ------------------------------------------------------------------------------

def same_config(official: dict, inferred: dict) -> bool:
    """True when every inferred value equals the official config (or the class default)."""
    defaults = _class_defaults(official)
    for key, value in inferred.items():
        expected = official.get(key, defaults.get(key))
        if _normalise(expected) != _normalise(value):
            return False
    return True


def _normalise(value):
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _class_defaults(config: dict) -> dict:
    """Constructor defaults of the config's class, for keys an official config leaves out."""
    class_name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if class_name == "UNet2DConditionModel":
        from trainer.models.unet import DEFAULTS

        return DEFAULTS
    if class_name == "AutoencoderKL":
        from trainer.models.vae import DEFAULTS

        return DEFAULTS
    return {}
