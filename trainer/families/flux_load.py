"""Load FLUX.1 offline: a diffusers FLUX folder, or kohya_ss users' separate files.

kohya_ss's Flux fields name four files: the BFL transformer (the base model path), ``clip_l``, ``t5xxl`` and
``ae``. Each is read here with its architecture taken from its own tensor shapes; fp8 (float8_e4m3fn) files
are upcast to the run's dtype. A diffusers folder supplies whatever of the three separate paths is empty.
Tokenizers: CLIP-L's is Nekoya's shipped CLIP vocabulary (or a ``<clip_l file>.tokenizers/`` folder for
another vocabulary size); T5's comes from a diffusers folder, a ``<t5xxl file>.tokenizers/`` folder, the
t5xxl file's own folder (``tokenizer.json``/``spiece.model``), or the local Hugging Face cache of
google/t5-v1_1-xxl, where sd-scripts takes it from. Nothing is downloaded.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.families.flux_files import T5_TOKENIZER_FIX, TOKENIZER_SIDECAR, find_t5_tokenizer
from trainer.families.flux_weights import config_from_bfl_shapes, config_from_diffusers, diffusers_to_bfl, strip_prefix
from trainer.problems import NekoyaError

# the FLUX.1 AE's latent normalisation (diffusers' FLUX vae/config.json; not stored in ae.safetensors)
AE_SCALING, AE_SHIFT = 0.3611, 0.1159


class FluxLoadError(NekoyaError):
    """A FLUX file or folder that cannot be used; ``field`` names the setting to fix."""

    def __init__(self, message: str, field: str = "pretrained_model_name_or_path") -> None:
        super().__init__(message)
        self.field = field


@dataclass
class FluxParts:
    transformer: Any
    clip: Any
    clip_tokenizer: Any
    t5: Any
    t5_tokenizer: Any
    vae: Any


def is_diffusers_flux(path: Path) -> bool:
    index = path / "model_index.json"
    return path.is_dir() and index.is_file() and "Flux" in json.loads(index.read_text()).get("_class_name", "")


def load_flux(settings: Any, dtype: torch.dtype) -> FluxParts:
    base = Path(str(settings.pretrained_model_name_or_path)).expanduser()
    folder = base if is_diffusers_flux(base) else None
    if folder is None and not base.is_file():
        raise FluxLoadError(f"{base} is neither a FLUX transformer file nor a diffusers FLUX folder")
    need = {"clip_l": "CLIP-L", "t5xxl": "T5-XXL", "ae": "AE (VAE)"}
    if folder is None:
        for key, name in need.items():
            if not str(getattr(settings, key) or "").strip():
                raise FluxLoadError(f"a FLUX transformer file needs the {name} file too: {key} is empty", key)
    transformer = load_transformer(folder or base, dtype)
    clip, clip_tok = load_clip(_path(settings.clip_l) or folder, dtype)
    t5, t5_tok = load_t5(_path(settings.t5xxl) or folder, dtype)
    vae = load_ae(_path(settings.ae) or folder, dtype)
    return FluxParts(transformer, clip, clip_tok, t5, t5_tok, vae)


def _path(value: Any) -> Path | None:
    text = str(value or "").strip()
    return Path(text).expanduser() if text else None


def read_tensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A .safetensors/.sft file's tensors (fp8 ones upcast to ``dtype``); .ckpt/.pt with weights_only."""
    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        tensors = tensors.get("state_dict", tensors)
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _folder_tensors(folder: Path, dtype) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FluxLoadError(f"{folder} has no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(read_tensors(file, dtype))
    return tensors


def _fill(model: torch.nn.Module, state: dict, what: str, tied: tuple[str, ...] = ()) -> torch.nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise FluxLoadError(f"{what}: tensors missing {missing[:3]} or unexpected {unexpected[:3]}")
    _fill_position_ids(model)
    return model


def _fill_position_ids(model: torch.nn.Module) -> None:
    """Non-persistent buffers of a model built on the meta device (CLIP's position ids) get their values."""
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise FluxLoadError(f"{type(model).__name__}: buffer {name} has no value")
        owner = model.get_submodule(name.rpartition(".")[0])
        owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)


# -- the transformer -----------------------------------------------------------------------------------
def load_transformer(source: Path, dtype):
    from trainer.models.flux import Flux

    if source.is_dir():
        config = config_from_diffusers(json.loads((source / "transformer" / "config.json").read_text()))
        state = diffusers_to_bfl(_folder_tensors(source / "transformer", dtype))
    else:
        state = strip_prefix(read_tensors(source, dtype))
        if "img_in.weight" not in state:
            raise FluxLoadError(f"{source.name} is not a FLUX.1 transformer file (no img_in.weight, double_blocks...)")
        config = config_from_bfl_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        model = Flux(config)
    return _fill(model, state, f"{source.name}: the FLUX transformer").to(dtype)


# -- CLIP-L ------------------------------------------------------------------------------------------
def load_clip(source: Path | None, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if source is None:
        raise FluxLoadError("no CLIP-L file: set clip_l", "clip_l")
    if source.is_dir():
        model = CLIPTextModel.from_pretrained(str(source / "text_encoder"), local_files_only=True, torch_dtype=dtype)
        return model, CLIPTokenizer.from_pretrained(str(source / "tokenizer"), local_files_only=True)
    state = {re.sub(r"^text_model\.", "", k): v for k, v in read_tensors(source, dtype).items()}
    if "embeddings.token_embedding.weight" not in state:
        raise FluxLoadError(f"{source.name} is not a CLIP-L text encoder file", "clip_l")
    vocab, hidden = state["embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(m[1]) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    tokenizer = _clip_tokenizer(source, vocab)
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=hidden // 64 if hidden >= 64 else hidden // 8,
        max_position_embeddings=state["embeddings.position_embedding.weight"].shape[0], hidden_act="quick_gelu",
        projection_dim=hidden, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device("meta"):
        model = CLIPTextModel(config)
    state.pop("embeddings.position_ids", None)
    return _fill(model, state, f"{source.name}: CLIP-L").to(dtype), tokenizer


def _clip_tokenizer(source: Path, vocab: int):
    from transformers import CLIPTokenizer

    from trainer.checkpoints.clip_vocab import REAL_VOCAB_SIZE
    from trainer.checkpoints.shipped import shipped_config_dir

    sidecar = Path(str(source) + TOKENIZER_SIDECAR)
    if sidecar.is_dir():
        return CLIPTokenizer.from_pretrained(str(sidecar), local_files_only=True)
    if vocab != REAL_VOCAB_SIZE:
        raise FluxLoadError(f"{source.name} has a {vocab}-token vocabulary, not CLIP's 49408: put its tokenizer "
                            f"next to it as {sidecar.name}/", "clip_l")
    return CLIPTokenizer.from_pretrained(str(shipped_config_dir("sd15") / "tokenizer"), local_files_only=True)


# -- T5-XXL ------------------------------------------------------------------------------------------
def load_t5(source: Path | None, dtype):
    from transformers import T5Config, T5EncoderModel

    if source is None:
        raise FluxLoadError("no T5-XXL file: set t5xxl", "t5xxl")
    if source.is_dir():
        model = T5EncoderModel.from_pretrained(str(source / "text_encoder_2"), local_files_only=True, torch_dtype=dtype)
        return model, _t5_tokenizer(source / "tokenizer_2")
    state = read_tensors(source, dtype)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" not in state:
        raise FluxLoadError(f"{source.name} is not a T5 text encoder file", "t5xxl")
    tokenizer = _t5_tokenizer(source)
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
    model = _fill(model, state, f"{source.name}: T5-XXL", tied=("encoder.embed_tokens.weight",))
    return model.to(dtype), tokenizer


def _t5_tokenizer(source: Path):
    from transformers import AutoTokenizer

    folder = find_t5_tokenizer(source)
    if folder is None:
        raise FluxLoadError(f"no T5 tokenizer for {source.name}: Nekoya never downloads; {T5_TOKENIZER_FIX}", "t5xxl")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


# -- the AE ------------------------------------------------------------------------------------------
def load_ae(source: Path | None, dtype):
    from diffusers import AutoencoderKL

    if source is None:
        raise FluxLoadError("no AE file: set ae", "ae")
    if source.is_dir():
        return AutoencoderKL.from_pretrained(str(source / "vae"), local_files_only=True, torch_dtype=dtype)
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = read_tensors(source, dtype)
    if "decoder.conv_in.weight" not in state:
        raise FluxLoadError(f"{source.name} is not an autoencoder file (no decoder.conv_in.weight)", "ae")
    config = ae_config({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    return _fill(model, convert_ldm_vae_checkpoint(state, config), f"{source.name}: the AE").to(dtype)


def ae_config(shapes: dict[str, tuple]) -> dict:
    """diffusers AutoencoderKL arguments of a BFL/LDM autoencoder file, with FLUX.1's latent normalisation."""
    blocks = 1 + max(int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    layers = 1 + max(int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1], "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "block_out_channels": [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(blocks)],
        "layers_per_block": layers, "latent_channels": shapes["decoder.conv_in.weight"][1],
        "norm_num_groups": 32, "scaling_factor": AE_SCALING, "shift_factor": AE_SHIFT,
        "use_quant_conv": "quant_conv.weight" in shapes, "use_post_quant_conv": "post_quant_conv.weight" in shapes,
    }


# -- models without weights (the LoRA tools' key and shape checks) -------------------------------------
def empty_flux_models(path: Path) -> tuple[torch.nn.Module, tuple]:
    """(transformer, (CLIP-L, T5)) of a FLUX folder or transformer file on the meta device: only configs and
    header shapes are read. A transformer file's CLIP-L is FLUX.1's (OpenAI CLIP-L), its T5 left out."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from trainer.checkpoints.integrity import read_safetensors_header
    from trainer.checkpoints.shipped import shipped_config_source
    from trainer.models.flux import Flux

    path = Path(path)
    with torch.device("meta"):
        if path.is_dir():
            transformer = Flux(config_from_diffusers(json.loads((path / "transformer" / "config.json").read_text())))
            clip = CLIPTextModel(CLIPTextConfig.from_pretrained(str(path / "text_encoder")))
            t5 = T5EncoderModel(T5Config.from_pretrained(str(path / "text_encoder_2")))
            return transformer, (clip, t5)
        shapes = strip_prefix(dict(read_safetensors_header(path).shapes))
        transformer = Flux(config_from_bfl_shapes(shapes))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(str(shipped_config_source("sd15") / "text_encoder")))
        return transformer, (clip,)
