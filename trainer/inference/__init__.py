"""Image generation: sample images during training, Try-it, regularisation images.

* :mod:`prompts` - sd-scripts' sample prompt syntax (no heavy imports)
* :mod:`schedulers` - sampler names -> diffusers schedulers
* :mod:`generate` - ``ImageGenerator``: the denoising loop over a family adapter
* :mod:`training_samples` - ``TrainingSamples``: the training loop's sampling hook
* :mod:`tryit` - ``TryIt.generate`` / ``TryIt.compare`` with kohya LoRA files
* :mod:`reg_images` - ``generate_reg_images``

Names are re-exported lazily, so ``import trainer.inference`` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SamplePrompt": "prompts", "parse_prompt_line": "prompts", "parse_sample_prompts": "prompts",
    "SAMPLER_NAMES": "schedulers", "make_scheduler": "schedulers",
    "ImageGenerator": "generate", "ImageSpec": "generate",
    "TrainingSamples": "training_samples", "sample_file_name": "training_samples",
    "TryIt": "tryit", "GenerateRequest": "tryit", "LoraChoice": "tryit",
    "LoraMismatchError": "lora_apply",
    "generate_reg_images": "reg_images", "existing_images": "reg_images",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
