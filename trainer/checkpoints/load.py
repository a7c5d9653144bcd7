"""Load UNet, VAE, text encoder(s), tokenizer(s) and scheduler config from a user's model, offline.

Accepts a diffusers folder, a single ``.safetensors``/``.ckpt`` file, or a hub id
that is already in the local Hugging Face cache. Nekoya never downloads: any
missing file is an error that asks for a local path.

Models are Nekoya's lean implementations (:mod:`trainer.models`), which keep
diffusers'/transformers' state-dict keys: a folder's weights load as they are,
and single files are converted with the key maps of :mod:`ldm_keys` into models
built (without allocating weights) from :func:`infer_config_dir`'s folder. Every
tensor of every model must be found: no silent random weights. Loading imports
neither diffusers nor transformers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.checkpoints.detect import ModelInfo, detect
from trainer.checkpoints.errors import CheckpointError
from trainer.checkpoints.infer import infer_config_dir
from trainer.checkpoints.ldm_keys import LDM_PREFIXES, SINGLE_FILE_LAYOUTS, from_ldm, key_candidates, vae_plan
from trainer.checkpoints.reader import TensorSource

TOKENIZER_FOR = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclass
class Components:
    family: str  # the checkpoint layout detect() reports (a family's FamilySpec.layout)
    unet: object
    vae: object
    text_encoders: tuple  # 1 (SD1/SD2) or 2 (SDXL) transformers CLIP models
    tokenizers: tuple  # one CLIPTokenizer per text encoder
    scheduler_config: dict  # the model's scheduler config (prediction_type included)
    info: ModelInfo
    config_dir: Path  # the diffusers folder the configs came from

    @property
    def text_encoder(self):
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def v_parameterization(self) -> bool:
        return self.scheduler_config.get("prediction_type") == "v_prediction"


def load_pipeline_components(path, family_hint=None, dtype=None, tokenizer_dir=None,
                             v_parameterization: bool | None = None) -> Components:
    """Load every component of the model at ``path`` (folder, single file or cached hub id).

    ``family_hint`` (a layout of ``trainer.checkpoints.layouts``: the family's ``FamilySpec.layout``)
    is checked against what the file says; a mismatch is an error rather than a
    silent reinterpretation. ``dtype`` defaults to float32.
    """
    import torch

    dtype = dtype or torch.float32
    path = resolve_model_path(path)
    info = detect(path).require_usable()
    if family_hint and family_hint != info.family:
        raise CheckpointError(f"{path} is an {info.family.upper()} model, but the settings say {family_hint.upper()}")
    if info.format == "diffusers":
        return _load_diffusers_folder(path, info, dtype, v_parameterization)
    config_dir = infer_config_dir(path, tokenizer_dir=tokenizer_dir, v_parameterization=v_parameterization)
    models = _load_single_file_models(path, info.family, config_dir, dtype)
    return _assemble(info, config_dir, models)


def resolve_model_path(path) -> Path:
    """A local path, or a hub id already in the local HF cache. Never downloads."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except Exception:  # not cached (LocalEntryNotFoundError) or an invalid id
            pass
    raise CheckpointError(
        f"{text} is not a local file or folder. Nekoya never downloads models: download the checkpoint "
        "yourself and select the local .safetensors file or diffusers folder."
    )


def _load_diffusers_folder(folder: Path, info: ModelInfo, dtype, v_parameterization) -> Components:
    from trainer.models.components import load_folder_component
    from trainer.models.weights import WeightsError

    models = {}
    for name in SINGLE_FILE_LAYOUTS[info.family]:
        try:
            models[name] = load_folder_component(folder, name, dtype)
        except (WeightsError, ValueError) as exc:
            raise CheckpointError(f"{folder}: {name}: {exc}") from None
        except Exception as exc:  # safetensors/torch errors of a damaged file, named in our words
            raise _unreadable(folder / name, exc) from exc
    components = _assemble(info, folder, models)
    if v_parameterization is not None:
        components.scheduler_config["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    return components


def _load_single_file_models(path: Path, family: str, config_dir: Path, dtype) -> dict:
    from trainer.models.components import empty_model

    with TensorSource(path) as source:
        available = set(source.keys())
        models = {}
        for name, (prefix, plan_builder) in SINGLE_FILE_LAYOUTS[family].items():
            model = empty_model(config_dir, name)
            _fill_from_single_file(model, plan_builder, prefix, source, available, f"{path.name}: the {name}", dtype)
            models[name] = model
    return models


def _fill_from_single_file(model, plan_builder, prefix: str, source: TensorSource, available: set, what: str, dtype):
    """Give the meta-device ``model`` its tensors from an original-layout file, every one required."""
    state_dict = {}
    for entry in plan_builder(model.state_dict().keys(), prefix=prefix):
        found = next((k for k in key_candidates(entry.ldm) if k in available), None)
        if found is None:
            raise CheckpointError(f"{what}: missing tensor {entry.ldm!r}")
        for key, tensor in zip(entry.diffusers, from_ldm(entry, source.get(found))):
            state_dict[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.eval()


def load_vae(path, config_dir: Path, dtype):
    """A separate VAE: a diffusers VAE folder, or one file in the original (``encoder.down.0...``, with or
    without ``first_stage_model.``) or diffusers (``encoder.down_blocks.0...``) layout."""
    from trainer.models.components import empty_model, model_factory
    from trainer.models.weights import WeightsError, build_with_weights, load_component

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE not found: {path}")
    try:
        if path.is_dir():
            return load_component(path, model_factory("AutoencoderKL"), dtype)
        model = empty_model(config_dir, "vae")
        with TensorSource(path) as source:
            available = set(source.keys())
            if set(model.state_dict()) <= available:  # already diffusers keys
                state = {k: source.get(k) for k in model.state_dict()}
                return build_with_weights(lambda: model, state, dtype, path.name)
            prefix = LDM_PREFIXES["vae"] if any(k.startswith(LDM_PREFIXES["vae"]) for k in available) else ""
            _fill_from_single_file(model, vae_plan, prefix, source, available, f"VAE {path.name}", dtype)
            return model
    except (WeightsError, ValueError) as exc:
        raise CheckpointError(f"VAE {path}: {exc}") from None
    except Exception as exc:  # safetensors/torch errors of a damaged file, named in our words
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    """The CheckpointError naming the damaged weights file in ``path`` (a file or a component folder)."""
    from trainer.checkpoints.integrity import unreadable_weights
    from trainer.safety import is_out_of_memory

    if is_out_of_memory(exc):  # not the file's fault: the run's out-of-memory advice applies
        raise exc
    return CheckpointError(unreadable_weights(sorted(path.iterdir()) if path.is_dir() else [path], exc))


def _assemble(info: ModelInfo, config_dir: Path, models: dict) -> Components:
    from trainer.models.clip_tokenizer import CLIPTokenizer

    encoders = [name for name in TOKENIZER_FOR if name in models]
    tokenizers = tuple(CLIPTokenizer.from_pretrained(config_dir / TOKENIZER_FOR[n]) for n in encoders)
    scheduler = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text())
    scheduler.setdefault("prediction_type", "epsilon")
    return Components(
        family=info.family,
        unet=models["unet"],
        vae=models["vae"],
        text_encoders=tuple(models[n] for n in encoders),
        tokenizers=tokenizers,
        scheduler_config=scheduler,
        info=info,
        config_dir=config_dir,
    )
