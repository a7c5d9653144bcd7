"""Load SD 3 / 3.5 offline: a diffusers SD3 folder, or a SAI single file with or without its text encoders.

A SAI file holds the MMDiT under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and, in the
"incl_clips" files, CLIP-L / CLIP-G / T5-XXL under ``text_encoders.clip_l|clip_g|t5xxl.transformer.``. kohya_ss's
SD3 fields (``sd3_clip_l``, ``clip_g``, ``sd3_t5xxl``) name separate encoder files; a set field wins over the
file's own encoder, as sd-scripts' --clip_l/--clip_g/--t5xxl do. Architectures come from tensor shapes; fp8
(float8_e4m3fn) files are upcast to the run's dtype. Tokenizers: CLIP-L's and CLIP-G's are Nekoya's shipped CLIP
vocabulary (CLIP-G padding with id 0, as sd-scripts), T5's comes from the folder, a ``<file>.tokenizers/``
folder, the T5 file's folder or the local Hugging Face cache of google/t5-v1_1-xxl. Nothing is downloaded.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.families.flux_load import read_tensors
from trainer.families.sd3_weights import config_from_diffusers, config_from_sai_shapes, diffusers_to_sai, strip_prefix
from trainer.problems import NekoyaError

SIDECAR = ".tokenizers"  # <file>.tokenizers/ (or <file>.tokenizers/<encoder>/) holds a file's own tokenizer
T5_HUB_ID = "google/t5-v1_1-xxl"
VAE_SCALING, VAE_SHIFT = 1.5305, 0.0609  # SD3's latent normalisation (diffusers' SD3 vae/config.json)
CLIP_VOCAB = 49408
# encoder -> (setting, name, prefix in a SAI file, diffusers subfolder, tokenizer subfolder)
ENCODERS = {
    "clip_l": ("sd3_clip_l", "CLIP-L", "text_encoders.clip_l.transformer.", "text_encoder", "tokenizer"),
    "clip_g": ("clip_g", "CLIP-G", "text_encoders.clip_g.transformer.", "text_encoder_2", "tokenizer_2"),
    "t5xxl": ("sd3_t5xxl", "T5-XXL", "text_encoders.t5xxl.transformer.", "text_encoder_3", "tokenizer_3"),
}


class SD3LoadError(NekoyaError):
    """An SD3 file or folder that cannot be used; ``field`` names the setting to fix."""

    def __init__(self, message: str, field: str = "pretrained_model_name_or_path") -> None:
        super().__init__(message)
        self.field = field


@dataclass
class SD3Parts:
    transformer: Any
    clip_l: Any
    clip_g: Any
    t5: Any
    tokenizers: tuple  # CLIP-L's, CLIP-G's, T5's
    vae: Any


def is_diffusers_sd3(path: Path) -> bool:
    index = path / "model_index.json"
    return path.is_dir() and index.is_file() and "StableDiffusion3" in json.loads(index.read_text()).get("_class_name", "")


def _path(value: Any) -> Path | None:
    text = str(value or "").strip()
    return Path(text).expanduser() if text else None


def load_sd3(settings: Any, dtype: torch.dtype) -> SD3Parts:
    base = Path(str(settings.pretrained_model_name_or_path)).expanduser()
    if is_diffusers_sd3(base):
        return _load_folder(base, settings, dtype)
    if not base.is_file():
        raise SD3LoadError(f"{base} is neither an SD3 model file nor a diffusers SD3 folder")
    tensors = read_tensors(base, dtype)
    mmdit = strip_prefix(tensors) or tensors  # a transformer-only file has no prefix
    if "x_embedder.proj.weight" not in mmdit:
        raise SD3LoadError(f"{base.name} is not an SD3 model file (no model.diffusion_model.joint_blocks...)")
    transformer = _mmdit(mmdit, f"{base.name}: the MMDiT", dtype)
    encoders = {role: _encoder(role, settings, tensors, base, dtype) for role in ENCODERS}
    vae = _vae_from_file(settings, tensors, base, dtype)
    return SD3Parts(transformer, encoders["clip_l"][0], encoders["clip_g"][0], encoders["t5xxl"][0],
                    tuple(encoders[role][1] for role in ENCODERS), vae)


def _load_folder(folder: Path, settings: Any, dtype) -> SD3Parts:
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    config = config_from_diffusers(json.loads((folder / "transformer" / "config.json").read_text()))
    state = diffusers_to_sai(_folder_tensors(folder / "transformer", dtype))
    transformer = _build_mmdit(config, state, f"{folder.name}: the transformer", dtype)
    loaded = {}
    for role, (key, _, _, sub, tok_sub) in ENCODERS.items():
        own = _path(getattr(settings, key, ""))
        if own is not None:  # a set field wins over the folder's encoder
            loaded[role] = _encoder_from_file(role, own, dtype)
            continue
        cls = T5EncoderModel if role == "t5xxl" else CLIPTextModelWithProjection
        model = cls.from_pretrained(str(folder / sub), local_files_only=True, torch_dtype=dtype)
        tok_cls = AutoTokenizer if role == "t5xxl" else CLIPTokenizer
        loaded[role] = (model, tok_cls.from_pretrained(str(folder / tok_sub), local_files_only=True))
    own_vae = _path(getattr(settings, "vae", ""))  # the VAE setting replaces the folder's, as sd-scripts' --vae
    vae = (_vae_from_file(settings, {}, folder, dtype) if own_vae is not None else
           AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True, torch_dtype=dtype))
    return SD3Parts(transformer, loaded["clip_l"][0], loaded["clip_g"][0], loaded["t5xxl"][0],
                    tuple(loaded[role][1] for role in ENCODERS), vae)


def _folder_tensors(folder: Path, dtype) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SD3LoadError(f"{folder} has no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(read_tensors(file, dtype))
    return tensors


def _fill(model: torch.nn.Module, state: dict, what: str, field: str, tied: tuple[str, ...] = ()) -> torch.nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise SD3LoadError(f"{what}: tensors missing {missing[:3]} or unexpected {unexpected[:3]}", field)
    for name, buffer in list(model.named_buffers()):  # CLIP's position ids (not stored) on the meta device
        if buffer.is_meta:
            owner = model.get_submodule(name.rpartition(".")[0])
            owner.register_buffer(name.rpartition(".")[2], torch.arange(buffer.shape[-1]).expand(buffer.shape),
                                  persistent=False)
    return model


# -- the MMDiT ----------------------------------------------------------------------------------------
def load_mmdit(path: Path, dtype):
    """The MMDiT alone, of a diffusers SD3 folder or a SAI file (with or without ``model.diffusion_model.``)."""
    path = Path(path)
    if is_diffusers_sd3(path):
        config = config_from_diffusers(json.loads((path / "transformer" / "config.json").read_text()))
        return _build_mmdit(config, diffusers_to_sai(_folder_tensors(path / "transformer", dtype)),
                            f"{path.name}: the transformer", dtype)
    tensors = read_tensors(path, dtype)
    return _mmdit(strip_prefix(tensors) or tensors, f"{path.name}: the MMDiT", dtype)


def _mmdit(state: dict, what: str, dtype):
    return _build_mmdit(config_from_sai_shapes({k: tuple(v.shape) for k, v in state.items()}), state, what, dtype)


def _build_mmdit(config, state: dict, what: str, dtype):
    from trainer.models.sd3 import MMDiT

    with torch.device("meta"):
        model = MMDiT(config)
    return _fill(model, state, what, "pretrained_model_name_or_path").to(dtype)


# -- text encoders ------------------------------------------------------------------------------------
def _encoder(role: str, settings: Any, tensors: dict, base: Path, dtype):
    key, name, prefix, _, _ = ENCODERS[role]
    own = _path(getattr(settings, key, ""))
    if own is not None:
        return _encoder_from_file(role, own, dtype)
    state = strip_prefix(tensors, prefix)
    if not state:
        raise SD3LoadError(f"{base.name} has no {name} text encoder (text_encoders.{role}.*): set {key} to your "
                           f"{role}.safetensors", key)
    return _encoder_from_state(role, state, base, dtype, sidecar_role=role)


def _encoder_from_file(role: str, path: Path, dtype):
    key, name = ENCODERS[role][:2]
    if not path.is_file():
        raise SD3LoadError(f"{key}: {path} does not exist", key)
    state = read_tensors(path, dtype)
    nested = strip_prefix(state, ENCODERS[role][2])  # a file saved with the SAI prefix
    return _encoder_from_state(role, nested or state, path, dtype)


def _encoder_from_state(role: str, state: dict, source: Path, dtype, sidecar_role: str = ""):
    if role == "t5xxl":
        return _t5(state, source, dtype, sidecar_role)
    return _clip(role, state, source, dtype, sidecar_role)


def _clip(role: str, state: dict, source: Path, dtype, sidecar_role: str):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    key, name = ENCODERS[role][:2]
    state = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}
    if "text_model.embeddings.token_embedding.weight" not in state:
        raise SD3LoadError(f"{source.name} is not a {name} text encoder file", key)
    vocab, hidden = state["text_model.embeddings.token_embedding.weight"].shape
    if "text_projection.weight" not in state:  # sd-scripts: a CLIP-L file without it gets the identity
        state["text_projection.weight"] = torch.eye(hidden, dtype=dtype)
    state.pop("text_model.embeddings.position_ids", None)
    layers = 1 + max(int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)))
    tokenizer = _clip_tokenizer(source, vocab, role, sidecar_role)
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=hidden // 64 if hidden >= 64 else hidden // 8,
        max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu" if role == "clip_l" else "gelu", projection_dim=state["text_projection.weight"].shape[0],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1,
    )
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    return _fill(model, state, f"{source.name}: {name}", key).to(dtype), tokenizer


def _sidecars(source: Path, sidecar_role: str) -> list[Path]:
    folder = Path(str(source) + SIDECAR)
    return [folder / sidecar_role, folder] if sidecar_role else [folder]


def _clip_tokenizer(source: Path, vocab: int, role: str, sidecar_role: str):
    from transformers import CLIPTokenizer

    from trainer.checkpoints.shipped import shipped_config_dir

    found = next((f for f in _sidecars(source, sidecar_role)
                  if (f / "vocab.json").is_file() or (f / "tokenizer.json").is_file()), None)
    if found is None and vocab != CLIP_VOCAB:
        key = ENCODERS[role][0]
        raise SD3LoadError(f"{source.name} has a {vocab}-token vocabulary, not CLIP's {CLIP_VOCAB}: put its tokenizer "
                           f"next to it as {source.name}{SIDECAR}/", key)
    tokenizer = CLIPTokenizer.from_pretrained(str(found or shipped_config_dir("sd15") / "tokenizer"),
                                              local_files_only=True)
    if role == "clip_g" and found is None:
        tokenizer.pad_token = "!"  # sd-scripts' SD3 tokenizer: CLIP-G pads with id 0 ("!")
    return tokenizer


def _t5(state: dict, source: Path, dtype, sidecar_role: str):
    from transformers import T5Config, T5EncoderModel

    if "shared.weight" not in state and "encoder.embed_tokens.weight" not in state:
        raise SD3LoadError(f"{source.name} is not a T5 text encoder file", "sd3_t5xxl")
    tokenizer = _t5_tokenizer(source, sidecar_role)
    embed = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    state.setdefault("shared.weight", embed)
    state.setdefault("encoder.embed_tokens.weight", embed)
    q = state["encoder.block.0.layer.0.SelfAttention.q.weight"]
    bias = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    heads = bias.shape[1]
    config = T5Config(
        vocab_size=embed.shape[0], d_model=embed.shape[1], d_kv=q.shape[0] // heads, num_heads=heads,
        d_ff=state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0], feed_forward_proj="gated-gelu",
        num_layers=1 + max(int(m[1]) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k))),
        relative_attention_num_buckets=bias.shape[0], is_encoder_decoder=False, use_cache=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = T5EncoderModel(config)
    model = _fill(model, state, f"{source.name}: T5-XXL", "sd3_t5xxl", tied=("encoder.embed_tokens.weight",))
    return model.to(dtype), tokenizer


def _t5_tokenizer(source: Path, sidecar_role: str):
    from transformers import AutoTokenizer

    candidates = [*_sidecars(source, sidecar_role), *([] if sidecar_role else [source.parent])]
    for folder in candidates:
        if (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    try:
        from huggingface_hub import snapshot_download

        return AutoTokenizer.from_pretrained(snapshot_download(T5_HUB_ID, local_files_only=True), local_files_only=True)
    except Exception:  # not cached
        raise SD3LoadError(
            f"no T5 tokenizer for {source.name}: Nekoya never downloads. Put T5's tokenizer files (tokenizer.json or "
            f"spiece.model) next to the T5-XXL file, or have {T5_HUB_ID} in the local Hugging Face cache",
            "sd3_t5xxl") from None


# -- the VAE ------------------------------------------------------------------------------------------
def _vae_from_file(settings: Any, tensors: dict, base: Path, dtype):
    own = _path(getattr(settings, "vae", ""))
    if own is not None:
        if not own.is_file():
            raise SD3LoadError(f"vae: {own} does not exist", "vae")
        state, source, field = read_tensors(own, dtype), own, "vae"
        state = strip_prefix(state, "first_stage_model.") or state
    else:
        state, source, field = strip_prefix(tensors, "first_stage_model."), base, "vae"
    if "decoder.conv_in.weight" not in state:
        raise SD3LoadError(f"{source.name} has no VAE (first_stage_model.*): set the VAE setting to the SD3 VAE file",
                           field)
    return vae_from_ldm(state, f"{source.name}: the VAE", dtype)


def vae_from_ldm(state: dict, what: str, dtype):
    """diffusers' AutoencoderKL of an LDM-key VAE state dict, with SD3's latent shift and scale."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from trainer.families.flux_load import ae_config

    config = {**ae_config({k: tuple(v.shape) for k, v in state.items()}),
              "scaling_factor": VAE_SCALING, "shift_factor": VAE_SHIFT}
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    return _fill(model, convert_ldm_vae_checkpoint(state, config), what, "vae").to(dtype)


# -- models without weights (the LoRA tools' key and shape checks) -------------------------------------
def empty_sd3_models(path: Path) -> tuple[torch.nn.Module, tuple]:
    """(MMDiT, (CLIP-L, CLIP-G[, T5])) of an SD3 folder or SAI file on the meta device (configs and header shapes)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from trainer.checkpoints.integrity import read_safetensors_header
    from trainer.models.sd3 import MMDiT

    path = Path(path)
    with torch.device("meta"):
        if path.is_dir():
            transformer = MMDiT(config_from_diffusers(json.loads((path / "transformer" / "config.json").read_text())))
            encoders = tuple(cls(cfg.from_pretrained(str(path / sub))) for cls, cfg, sub in (
                (CLIPTextModelWithProjection, CLIPTextConfig, "text_encoder"),
                (CLIPTextModelWithProjection, CLIPTextConfig, "text_encoder_2"),
                (T5EncoderModel, T5Config, "text_encoder_3")))
            return transformer, encoders
        shapes = dict(read_safetensors_header(path).shapes)
        mmdit = strip_prefix(shapes) or shapes
        transformer = MMDiT(config_from_sai_shapes(mmdit))
        encoders = []
        for role in ("clip_l", "clip_g"):
            enc = strip_prefix(shapes, ENCODERS[role][2])
            if enc:
                encoders.append(CLIPTextModelWithProjection(_clip_config_from_shapes(enc, role)))
        return transformer, tuple(encoders)


def _clip_config_from_shapes(shapes: dict, role: str):
    from transformers import CLIPTextConfig

    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    layers = 1 + max(int(m[1]) for k in shapes if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)))
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=layers, num_attention_heads=hidden // 64 if hidden >= 64 else hidden // 8,
        hidden_act="quick_gelu" if role == "clip_l" else "gelu", projection_dim=hidden,
    )
