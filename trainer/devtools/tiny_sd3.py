"""Tiny random SD 3 / 3.5 models for tests, in every layout Nekoya loads.

* ``build_tiny_sd3_folder``: a diffusers ``StableDiffusion3Pipeline`` folder (MMDiT, CLIP-L and CLIP-G with
  projections, T5, 16-channel VAE, three tokenizers, the flow-matching scheduler); ``sd35=True`` gives SD 3.5's
  q/k RMS norm and an MMDiT-X self-attention in the first block.
* ``write_sd3_single_files``: the same weights as kohya_ss users have them: a SAI file (``model.diffusion_model.``,
  ``first_stage_model.``, with or without ``text_encoders.clip_l|clip_g|t5xxl.transformer.``) and the separate
  ``clip_l`` / ``clip_g`` / ``t5xxl`` files, each tokenizer beside its file as ``<file>.tokenizers/``
  (``<file>.tokenizers/<encoder>/`` for the SAI file's own encoders); optionally in float8_e4m3fn.

SAI's conventions are kept (64 per attention head, 2x2 patches, a square position table, CLIP-L|G states padded
to T5's width) at widths that train in milliseconds.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from trainer.devtools.tiny_flux import TINY_AE, write_t5_tokenizer

TINY_MMDIT = {
    "sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 64, "num_attention_heads": 2, "joint_attention_dim": 64, "caption_projection_dim": 128,
    "pooled_projection_dim": 64, "pos_embed_max_size": 16,
}
SD35_EXTRA = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}
TINY_SD3_T5 = {"d_model": 64, "d_kv": 16, "d_ff": 37, "num_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu",
               "relative_attention_num_buckets": 8, "is_encoder_decoder": False, "use_cache": False}
TINY_SD3_VAE = {**TINY_AE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
ENCODER_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                    "t5xxl": "text_encoders.t5xxl.transformer."}
DIFFUSERS_PARTS = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
                   "t5xxl": ("text_encoder_3", "tokenizer_3")}


def tiny_sd3_parts(seed: int = 0, sd35: bool = False) -> dict:
    import diffusers
    import torch
    import transformers

    from trainer.checkpoints.clip_vocab import write_tokenizer
    from trainer.families.tiny_models import _text_encoder

    torch.manual_seed(seed)
    clip_l = {k: v for k, v in _text_encoder("quick_gelu", projection=True).items() if k != "class"}
    clip_g = {k: v for k, v in _text_encoder("gelu", projection=True, pad_id=0).items() if k != "class"}
    with tempfile.TemporaryDirectory() as staging:
        tok_l = transformers.CLIPTokenizer.from_pretrained(write_tokenizer(Path(staging) / "l", real=False))
        tok_g = transformers.CLIPTokenizer.from_pretrained(write_tokenizer(Path(staging) / "g", real=False, pad_token="!"))
        t5_tok = transformers.AutoTokenizer.from_pretrained(str(write_t5_tokenizer(Path(staging) / "t5", 256)))
    transformer = diffusers.SD3Transformer2DModel(**TINY_MMDIT, **(SD35_EXTRA if sd35 else {}))
    with torch.no_grad():  # keep outputs well away from zero (some layers start at zero)
        for p in transformer.parameters():
            p.normal_(0, 0.05)
    return {
        "transformer": transformer,
        "text_encoder": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**clip_l)),
        "tokenizer": tok_l,
        "text_encoder_2": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**clip_g)),
        "tokenizer_2": tok_g,
        "text_encoder_3": transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(t5_tok), pad_token_id=0, eos_token_id=1, **TINY_SD3_T5)),
        "tokenizer_3": t5_tok,
        "vae": diffusers.AutoencoderKL(**TINY_SD3_VAE),
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def build_tiny_sd3_folder(out_dir, seed: int = 0, sd35: bool = False) -> Path:
    """A tiny SD3 (or, with ``sd35``, SD 3.5 Medium-like) diffusers folder."""
    import diffusers

    out_dir = Path(out_dir)
    diffusers.StableDiffusion3Pipeline(**tiny_sd3_parts(seed, sd35)).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def sai_state_dict(folder, encoders: bool = True) -> dict:
    """A diffusers SD3 folder's weights in SAI's single-file keys (``text_encoders.*`` only with ``encoders``)."""
    from trainer.checkpoints.ldm_keys import to_ldm, vae_plan
    from trainer.devtools.single_file import read_component_weights
    from trainer.families.sd3_weights import SAI_PREFIX, diffusers_to_sai

    folder = Path(folder)
    vae = read_component_weights(folder / "vae")
    state = {SAI_PREFIX + k: v for k, v in diffusers_to_sai(read_component_weights(folder / "transformer")).items()}
    state.update({"first_stage_model." + e.ldm: to_ldm(e, [vae[k] for k in e.diffusers])
                  for e in vae_plan(vae, prefix="")})
    if encoders:
        for role, prefix in ENCODER_PREFIXES.items():
            state.update({prefix + k: v for k, v in encoder_weights(folder, role).items()})
    return state


def encoder_weights(folder: Path, role: str) -> dict:
    """One text encoder's weights as its separate file stores them (CLIP: ``text_model.*``, ``text_projection``)."""
    from trainer.devtools.single_file import read_component_weights

    tensors = read_component_weights(Path(folder) / DIFFUSERS_PARTS[role][0])
    if role == "t5xxl":
        return tensors
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in tensors.items()}


def write_sd3_single_files(folder, out_dir, dtype=None) -> dict[str, Path]:
    """{"full": SAI file with encoders, "bare": SAI file without, "clip_l", "clip_g", "t5xxl"} -> path."""
    folder, out_dir = Path(folder), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"full": out_dir / "sd3-tiny_incl_clips_t5.safetensors", "bare": out_dir / "sd3-tiny.safetensors"}
    _save(sai_state_dict(folder, encoders=True), paths["full"], dtype)
    _save(sai_state_dict(folder, encoders=False), paths["bare"], dtype)
    for role, (_, tokenizer) in DIFFUSERS_PARTS.items():
        paths[role] = out_dir / f"{role}.safetensors"
        _save(encoder_weights(folder, role), paths[role], dtype)
        shutil.copytree(folder / tokenizer, Path(str(paths[role]) + ".tokenizers"), dirs_exist_ok=True)
        shutil.copytree(folder / tokenizer, Path(str(paths["full"]) + ".tokenizers") / role, dirs_exist_ok=True)
    return paths


def _save(tensors: dict, path: Path, dtype) -> None:
    from safetensors.torch import save_file

    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
