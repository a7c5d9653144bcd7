"""Tiny random FLUX.1 models for tests, in every layout Nekoya loads.

* ``build_tiny_flux_folder``: a diffusers ``FluxPipeline`` folder (transformer, CLIP-L, T5, 16-channel AE,
  both tokenizers, the flow-matching scheduler).
* ``write_flux_single_files``: the same weights as kohya_ss users have them: a BFL-layout transformer file
  (``double_blocks.0.img_attn.qkv...``), ``clip_l`` (``text_model.*`` keys), ``t5xxl`` and ``ae`` (LDM keys),
  each tokenizer beside its encoder file as ``<file>.tokenizers/``; optionally in float8_e4m3fn.

The architecture keeps FLUX.1's conventions (64-dim packed input from 16 latent channels, 2x2 patches, RoPE
axes in FLUX.1's proportions, guidance embedding for dev) at widths that train in milliseconds.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

TINY_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 32,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 14, 14],
}
TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu",
           "relative_attention_num_buckets": 8, "is_encoder_decoder": False, "use_cache": False}
TINY_AE = {"block_out_channels": [32, 32, 32, 32], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "latent_channels": 16,
           "norm_num_groups": 32, "sample_size": 64, "scaling_factor": 0.3611, "shift_factor": 0.1159,
           "use_quant_conv": False, "use_post_quant_conv": False}
T5_WORDS = ("a", "photo", "of", "sks", "dog", "cat", "red", "blue", "in", "the", "garden", "with", "on", "tiny")


def write_t5_tokenizer(folder: Path, max_length: int = 512) -> Path:
    """A word-level tokenizer in T5's conventions (pad 0, eos 1 appended, unk 2) that transformers loads offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(T5_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
        "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder


def tiny_flux_parts(seed: int = 0, guidance: bool = True) -> dict:
    import diffusers
    import torch
    import transformers

    from trainer.checkpoints.clip_vocab import write_tokenizer
    from trainer.families.tiny_models import TINY_SD1

    torch.manual_seed(seed)
    clip_config = {k: v for k, v in TINY_SD1.text_encoders[0].items() if k != "class"}
    with tempfile.TemporaryDirectory() as staging:
        clip_tok = transformers.CLIPTokenizer.from_pretrained(write_tokenizer(Path(staging) / "clip", real=False))
        t5_tok = transformers.AutoTokenizer.from_pretrained(str(write_t5_tokenizer(Path(staging) / "t5")))
    transformer = diffusers.FluxTransformer2DModel(**TINY_TRANSFORMER, guidance_embeds=guidance)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but keep outputs well away from zero
        for p in transformer.parameters():
            p.normal_(0, 0.05)
    return {
        "transformer": transformer,
        "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_config)),
        "tokenizer": clip_tok,
        "text_encoder_2": transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(t5_tok), pad_token_id=0, eos_token_id=1, **TINY_T5)),
        "tokenizer_2": t5_tok,
        "vae": diffusers.AutoencoderKL(**TINY_AE),
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def build_tiny_flux_folder(out_dir, seed: int = 0, guidance: bool = True) -> Path:
    """A tiny FLUX.1 dev (``guidance``) or schnell diffusers folder."""
    import diffusers

    out_dir = Path(out_dir)
    diffusers.FluxPipeline(**tiny_flux_parts(seed, guidance)).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_flux_single_files(folder, out_dir, dtype=None) -> dict[str, Path]:
    """kohya_ss's four FLUX files from a diffusers FLUX folder: {"transformer", "clip_l", "t5xxl", "ae"} -> path."""
    import shutil

    from trainer.checkpoints.ldm_keys import to_ldm, vae_plan
    from trainer.devtools.single_file import read_component_weights
    from trainer.families.flux_weights import diffusers_to_bfl

    folder, out_dir = Path(folder), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae = read_component_weights(folder / "vae")
    files = {
        "transformer": (out_dir / "flux1-tiny.safetensors", diffusers_to_bfl(read_component_weights(folder / "transformer"))),
        "clip_l": (out_dir / "clip_l.safetensors",
                   {"text_model." + k: v for k, v in read_component_weights(folder / "text_encoder").items()}),
        "t5xxl": (out_dir / "t5xxl.safetensors", read_component_weights(folder / "text_encoder_2")),
        "ae": (out_dir / "ae.safetensors",
               {e.ldm: to_ldm(e, [vae[k] for k in e.diffusers]) for e in vae_plan(vae, prefix="")}),
    }
    for name, (path, tensors) in files.items():
        _save(tensors, path, dtype)
    for name, sub in (("clip_l", "tokenizer"), ("t5xxl", "tokenizer_2")):
        shutil.copytree(folder / sub, Path(str(files[name][0]) + ".tokenizers"), dirs_exist_ok=True)
    return {name: path for name, (path, _) in files.items()}


def _save(tensors: dict, path: Path, dtype) -> None:
    from safetensors.torch import save_file

    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
