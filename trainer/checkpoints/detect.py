"""Identify a model path: which SD family, which format, and whether it is usable.

Only keys, shapes and configs are read (a ``.safetensors`` header, a diffusers
folder's JSON files), never all the weights; ``.ckpt`` files are the exception
(pickles have no separate header), loaded memory-mapped with ``weights_only``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.checkpoints.errors import CheckpointError
from trainer.checkpoints.layouts import FLUX1, SD1, SD2, SD3, SDXL
from trainer.checkpoints.ldm_keys import LDM_PREFIXES
from trainer.checkpoints.reader import TensorSource
from trainer.checkpoints.weight_files import UnreadableIndex, component_weight_files
from trainer.families.registry import spec_for_checkpoint

UNET_PROBE = LDM_PREFIXES["unet"] + "input_blocks.0.0.weight"

# Text-encoder prefix in a single file -> family. Checked in order.
TEXT_ENCODER_FAMILIES = (
    (LDM_PREFIXES["sdxl_openclip"], SDXL),
    (LDM_PREFIXES["openclip"], SD2),
    (LDM_PREFIXES["clip"], SD1),
)
# Markers of files that are not base models: (substring in some key, kind, why it cannot be used).
NOT_A_BASE_MODEL = (
    ("lora_down", "lora", "this is a LoRA file, not a base model; load it as network weights instead"),
    ("lora_A", "lora", "this is a LoRA file (PEFT format), not a base model; load it as network weights instead"),
    ("hada_w1", "lora", "this is a LyCORIS (LoHa) file, not a base model; load it as network weights instead"),
    ("lokr_w1", "lora", "this is a LyCORIS (LoKr) file, not a base model; load it as network weights instead"),
    ("string_to_param", "embedding", "this is a textual-inversion embedding, not a base model"),
    ("emb_params", "embedding", "this is a textual-inversion embedding, not a base model"),
    ("decoder.conv_in.weight", "vae", "this is a VAE on its own, not a full Stable Diffusion checkpoint; "
                                      "use it as the separate VAE setting"),
    ("down_blocks.0.resnets.0.conv1.weight", "unet", "this is a diffusers UNet weights file on its own; "
                                                      "select the whole diffusers folder (with model_index.json)"),
)
# safetensors "modelspec" metadata value -> v-parameterisation
MODELSPEC_PREDICTION = {"v": True, "v_prediction": True, "epsilon": False, "eps": False}


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    format: str  # "diffusers" | "safetensors" | "ckpt"
    family: str | None  # a layout of trainer.checkpoints.layouts; None when the file is not a usable SD model
    v_parameterization: bool | None  # None: the file does not say (SD2 single files)
    kind: str = "checkpoint"  # "checkpoint" | "lora" | "embedding" | "vae" | "unet" | "unknown"
    problems: tuple[str, ...] = ()  # why the model cannot be used as-is; empty when fine

    @property
    def ok(self) -> bool:
        return self.family is not None and not self.problems

    def require_usable(self) -> "ModelInfo":
        if not self.ok:
            raise CheckpointError(f"{self.path}: " + "; ".join(self.problems or ("not a Stable Diffusion model",)))
        return self


def detect(path) -> ModelInfo:
    """Describe the model at ``path`` (a diffusers folder or a single file)."""
    path = Path(path)
    if path.is_dir():
        return detect_diffusers_folder(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    with TensorSource(path) as source:
        return detect_from_keys(path, source.format, source.shapes(), source.metadata)


def detect_from_keys(path: Path, fmt: str, shapes: dict[str, tuple], metadata: dict | None = None) -> ModelInfo:
    """Family and problems of a single file, from its key names and tensor shapes."""
    keys = list(shapes)
    if is_bfl_flux(shapes):  # the encoders and AE are separate files (the Flux.1 settings name them)
        return ModelInfo(path, fmt, FLUX1, False, "checkpoint", ())
    if is_sai_sd3(shapes):  # its text encoders may be in the file or separate files (the SD3 settings name them)
        return ModelInfo(path, fmt, SD3, False, "checkpoint", ())
    if UNET_PROBE not in shapes:
        kind, reason = _not_a_base_model(keys)
        return ModelInfo(path, fmt, None, None, kind, (reason,))
    family, problems = _single_file_family(keys, shapes)
    problems += _missing_parts(keys, shapes)
    v_param = _v_parameterization(keys, metadata or {}, family)
    return ModelInfo(path, fmt, family if family else None, v_param, "checkpoint", tuple(problems))


def is_bfl_flux(shapes: dict) -> bool:
    """A FLUX.1 transformer in Black Forest Labs' layout (as BFL, kohya_ss and ComfyUI store it)."""
    prefix = "model.diffusion_model." if "model.diffusion_model.img_in.weight" in shapes else ""
    return prefix + "img_in.weight" in shapes and any(k.startswith(prefix + "double_blocks.") for k in shapes)


def is_sai_sd3(shapes: dict) -> bool:
    """An SD 3 / 3.5 MMDiT in Stability AI's layout (joint_blocks; ``model.diffusion_model.`` in a full file)."""
    prefix = "model.diffusion_model." if "model.diffusion_model.x_embedder.proj.weight" in shapes else ""
    return prefix + "x_embedder.proj.weight" in shapes and prefix + "joint_blocks.0.x_block.attn.qkv.weight" in shapes


def _not_a_base_model(keys: list[str]) -> tuple[str, str]:
    for marker, kind, reason in NOT_A_BASE_MODEL:
        if any(marker in key for key in keys):
            return kind, reason
    return "unknown", (
        "not a Stable Diffusion checkpoint: it has no UNet weights (model.diffusion_model.*)"
        f" among its {len(keys)} tensors"
    )


def _single_file_family(keys: list[str], shapes: dict) -> tuple[str | None, list[str]]:
    for prefix, family in TEXT_ENCODER_FAMILIES:
        if any(k.startswith(prefix) for k in keys):
            return family, []
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return None, ["this is an SDXL refiner; LoRA training needs an SDXL base model"]
    return _family_from_unet(keys, shapes), ["the file has no text encoder weights"]


def _family_from_unet(keys: list[str], shapes: dict) -> str:
    unet = LDM_PREFIXES["unet"]
    if unet + "label_emb.0.0.weight" in shapes:
        return SDXL
    proj_in = next((k for k in keys if k.startswith(unet) and k.endswith(".proj_in.weight")), None)
    return SD2 if proj_in and len(shapes[proj_in]) == 2 else SD1


def _missing_parts(keys: list[str], shapes: dict) -> list[str]:
    problems = []
    if not any(k.startswith(LDM_PREFIXES["vae"]) for k in keys):
        problems.append("the file has no VAE weights (first_stage_model.*)")
    in_channels = shapes[UNET_PROBE][1]
    if in_channels != 4:
        kind = "an inpainting model" if in_channels == 9 else f"a UNet with {in_channels} input channels"
        problems.append(f"this is {kind}; LoRA training needs a standard text-to-image model (4 input channels)")
    return problems


def _v_parameterization(keys: list[str], metadata: dict, family: str | None) -> bool | None:
    if "v_pred" in keys:  # marker tensor some v-prediction SDXL files carry
        return True
    declared = MODELSPEC_PREDICTION.get(str(metadata.get("modelspec.prediction_type", "")).lower())
    if declared is not None:
        return declared
    # Some families' files do not tell (SD2 512-base and 768-v have identical tensors): their spec says so.
    return None if family is not None and not spec_for_checkpoint(family).files_tell_prediction else False


# ---- diffusers folders -------------------------------------------------------------------

def detect_diffusers_folder(folder: Path) -> ModelInfo:
    index_path = folder / "model_index.json"
    if not index_path.exists():
        return ModelInfo(folder, "diffusers", None, None, "unknown", (
            "not a diffusers model folder (no model_index.json); select the folder that contains it, "
            "or a single .safetensors checkpoint",))
    index = json.loads(index_path.read_text(encoding="utf-8"))
    family = _folder_family(folder, index)
    problems = [f"the folder has no {name} weights" for name in _components(index) if not _has_weights(folder / name)]
    in_channels = _read_json(folder / "unet" / "config.json").get("in_channels", 4)
    if in_channels != 4:
        problems.append(f"the UNet has {in_channels} input channels; LoRA training needs a text-to-image model (4)")
    if family is None:
        problems.insert(0, f"unsupported pipeline {index.get('_class_name')!r}; expected Stable Diffusion 1.x, 2.x or XL")
    prediction = _read_json(folder / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
    return ModelInfo(folder, "diffusers", family, prediction == "v_prediction", "checkpoint", tuple(problems))


def _folder_family(folder: Path, index: dict) -> str | None:
    cls = index.get("_class_name", "")
    if cls == "FluxPipeline":
        return FLUX1
    if cls == "StableDiffusion3Pipeline":
        return SD3
    if cls == "StableDiffusionXLPipeline":
        return SDXL
    if cls != "StableDiffusionPipeline":
        return None
    unet = _read_json(folder / "unet" / "config.json")
    text = _read_json(folder / "text_encoder" / "config.json")
    return SD2 if text.get("hidden_act") == "gelu" or unet.get("use_linear_projection") else SD1


def _components(index: dict) -> list[str]:
    wanted = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2")
    return [name for name in wanted if isinstance(index.get(name), list) and index[name][0] is not None]


def _has_weights(folder: Path) -> bool:
    """Whether the loader finds weights in the component folder (trainer.checkpoints.weight_files' rule)."""
    try:
        return bool(component_weight_files(folder))
    except UnreadableIndex:
        return True  # it has an index; the weights check and the loader name what is wrong with it


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
