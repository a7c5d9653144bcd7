"""The lean class for each component class name a ``model_index.json`` lists, and builders by folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trainer.models.weights import load_component

TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")


def model_factory(class_name: str) -> Callable[[dict], nn.Module]:
    """``config dict -> module`` for a diffusers/transformers class name of an SD pipeline component."""
    if class_name == "UNet2DConditionModel":
        from trainer.models.unet import UNet2DConditionModel

        return UNet2DConditionModel.from_config
    if class_name == "AutoencoderKL":
        from trainer.models.vae import AutoencoderKL

        return AutoencoderKL.from_config
    if class_name in TEXT_ENCODER_CLASSES:
        from trainer.models import clip_text

        return getattr(clip_text, class_name).from_config
    raise ValueError(f"{class_name} is not a Stable Diffusion 1/2/XL component Nekoya can load")


def component_class(config_dir: Path, name: str) -> str:
    """The class name ``model_index.json`` gives for component ``name`` ("unet", "text_encoder_2" ...)."""
    index = json.loads((Path(config_dir) / "model_index.json").read_text())
    return index[name][1]


def empty_model(config_dir: Path, name: str) -> nn.Module:
    """Component ``name`` of the pipeline folder ``config_dir``, parameters on the meta device."""
    factory = model_factory(component_class(config_dir, name))
    config = json.loads((Path(config_dir) / name / "config.json").read_text())
    with torch.device("meta"):
        return factory(config)


def load_folder_component(folder: Path, name: str, dtype: torch.dtype) -> nn.Module:
    """Component ``name`` of the diffusers pipeline folder ``folder``, with its weights."""
    return load_component(Path(folder) / name, model_factory(component_class(folder, name)), dtype)
