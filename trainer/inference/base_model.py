"""A base model loaded for generating images (Try-it, regularisation images), outside training.

Loading goes through the same family adapters as training, so SD1, SD2 (v or
epsilon) and SDXL folders or single files all work, and a LoRA's kohya names
match the layers exactly as they do for the trainer.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

LogFn = Callable[[str, str], None]


@dataclass
class BaseModel:
    key: tuple  # identity for the cache: path, file time, v-prediction, device, dtype
    family_key: str  # the family's registry key (trainer.families)
    family: Any  # the loaded family adapter (unet, vae, text encoders, tokenizers)
    device: torch.device
    dtype: torch.dtype

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def inference_device_and_dtype(device: str | torch.device | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 (fp16 on GPUs without bf16) when there is one, else CPU in fp32."""
    from trainer.optim.precision import pick_device

    device = torch.device(device) if device is not None else pick_device()
    if device.type != "cuda":
        return device, torch.float32
    return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def model_key(path: str, v_parameterization: bool | None, device: torch.device, dtype: torch.dtype,
              model_files: tuple = ()) -> tuple:
    from trainer.checkpoints import resolve_model_path

    resolved = resolve_model_path(path)
    files = tuple((name, value, _mtime(value)) for name, value in model_files)
    return str(resolved.resolve()), _mtime(resolved), v_parameterization, str(device), str(dtype), files


def load_base_model(path: str, v_parameterization: bool | None = None, device: str | torch.device | None = None,
                    log: LogFn | None = None, model_files: dict[str, str] | None = None) -> BaseModel:
    """Load every component of ``path`` for inference. ``v_parameterization`` None: as the model says
    (epsilon when it does not say, e.g. an SD2 single file without metadata). ``model_files``: the separate
    part files of a model that has them, by setting (a FLUX transformer file's clip_l, t5xxl, ae)."""
    from trainer.checkpoints import detect, resolve_model_path
    from trainer.families import spec_for_checkpoint
    from trainer.settings import TrainingSettings

    log = log or (lambda message, level="info": None)
    device, dtype = inference_device_and_dtype(device)
    key = model_key(path, v_parameterization, device, dtype)
    info = detect(resolve_model_path(path)).require_usable()
    v_pred = bool(info.v_parameterization) if v_parameterization is None else bool(v_parameterization)
    spec = spec_for_checkpoint(info.family)
    settings = TrainingSettings(pretrained_model_name_or_path=str(path), v_parameterization=v_pred, **spec.flags,
                                **(model_files or {}))
    family = spec.adapter_class()(settings)
    family.load(settings, dtype, device, log)
    family.set_attention("sdpa", log)
    if family.vae.dtype != torch.float32:  # decoding in fp32: half VAEs (SDXL's) overflow to black images
        family.vae.to(dtype=torch.float32)
    return BaseModel(key, spec.key, family, device, dtype)


def _mtime(path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0
