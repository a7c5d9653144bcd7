"""The options of the image forms (Try it, regularisation images), each declared once.

The GUI builds their widgets from these models and ``GenerateRequest`` / ``generate_reg_images``
take their defaults from them. Torch-free, so the GUI can import it at start-up.
"""
from __future__ import annotations

from pydantic import BaseModel

from trainer.settings import setting_info
from trainer.settings.field import option

SAMPLE_SAMPLER = setting_info("sample_sampler")  # the training samples' sampler: same choices and default


class ImageOptions(BaseModel):
    width: int = option(512, label="Width", ge=64, step=64)
    height: int = option(512, label="Height", ge=64, step=64)
    cfg_scale: float = option(7.0, label="CFG scale", step=0.5)
    sampler: str = option(SAMPLE_SAMPLER.default, label="Sampler", choices=SAMPLE_SAMPLER.choices)


class TryItRequest(ImageOptions):
    base_model: str = option("", label="Base model", widget="path", help="Prefilled from the Source Model tab.")
    lora: str | None = option(None, label="LoRA file", help="Empty: the base model alone.")
    weight: float = option(0.8, label="LoRA weight", ge=-1.0, le=2.0, step=0.05, widget="slider")
    steps: int = option(20, label="Steps", ge=1)
    seed: int = option(-1, label="Seed (-1 random)", ge=-1)
    count: int = option(1, label="Images", ge=1, le=16)


class RegImagesRequest(ImageOptions):
    total: int = option(200, label="Total number wanted", ge=0)
    steps: int = option(30, label="Steps", ge=1)
