"""Random Stable-Diffusion-shaped models and datasets for tests and benchmarks.

Nothing here downloads anything: architectures come from the family specs
(:mod:`trainer.devtools.tiny_specs`) or the shipped config folders, weights are
random (seeded), tokenizers are written from local vocabulary files.

* :func:`build_tiny_pipeline` -> a diffusers folder (``size="tiny"`` for tests,
  a tiny model's ``full_sizes`` for the real SD 1.5 / 2.1 / SDXL base architectures, benchmarks only).
* :func:`save_single_file` -> the original LDM/SGM single-file layout.
* :func:`make_image_folder` -> a kohya-style image folder with captions.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from trainer.checkpoints.clip_vocab import write_tokenizer
from trainer.checkpoints.shipped import read_component_config, shipped_config_dir, shipped_config_source
from trainer.devtools.images import add_corrupt_image, add_tiny_image, make_image_folder
from trainer.devtools.single_file import save_single_file
from trainer.devtools.tiny_specs import TinySpec, tiny_spec
from trainer.families.stable_diffusion import SD1

__all__ = ["build_tiny_pipeline", "save_single_file", "make_image_folder", "add_corrupt_image", "add_tiny_image"]


def build_tiny_pipeline(out_dir, family: str = SD1.key, seed: int = 0, size: str = "tiny") -> Path:
    """Save a random pipeline as a diffusers folder: ``family`` names a tiny model a registered family
    declares (its key, or a variant such as SD2's 768-v); ``size`` is "tiny", or a real architecture that
    tiny model lists in ``full_sizes`` (benchmarks only)."""
    spec = tiny_spec(family)
    out_dir = Path(out_dir)
    if size == "tiny":
        pipe = _tiny_pipeline(spec, seed)
    elif size in spec.full_sizes:
        pipe = _full_pipeline(spec.full_sizes[size], seed)
    else:
        raise ValueError(f"size {size!r} is not available for family {family!r}")
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _tiny_pipeline(spec: TinySpec, seed: int):
    import diffusers
    import torch
    import transformers
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**spec.unet)
    vae = diffusers.AutoencoderKL(**spec.vae)
    encoders = []
    for te in spec.text_encoders:
        kwargs = {k: v for k, v in te.items() if k != "class"}
        encoders.append(getattr(transformers, te["class"])(transformers.CLIPTextConfig(**kwargs)))
    # Tokenizers have to round-trip through disk: transformers 5 builds them from files only.
    with tempfile.TemporaryDirectory() as staging:
        tokenizers = [
            CLIPTokenizer.from_pretrained(write_tokenizer(Path(staging) / str(i), real=False, pad_token=pad))
            for i, pad in enumerate(spec.tokenizer_pads)
        ]
    scheduler = _scheduler_from_config(read_component_config(shipped_config_source(spec.scheduler_config), "scheduler"))
    parts = {"unet": unet, "vae": vae, "scheduler": scheduler}
    for index, (encoder, tokenizer) in enumerate(zip(encoders, tokenizers)):
        suffix = "" if index == 0 else f"_{index + 1}"
        parts["text_encoder" + suffix], parts["tokenizer" + suffix] = encoder, tokenizer
    return _make_pipeline(spec.pipeline_class, parts)


def _full_pipeline(config_name: str, seed: int):
    """Real-size architecture with random init (several GB of RAM; benchmarks only)."""
    import diffusers
    import torch
    import transformers
    from transformers import CLIPTokenizer

    config_dir = shipped_config_dir(config_name)
    index = json.loads((config_dir / "model_index.json").read_text())
    torch.manual_seed(seed)
    parts = {
        "unet": diffusers.UNet2DConditionModel.from_config(read_component_config(config_dir, "unet")),
        "vae": diffusers.AutoencoderKL.from_config(read_component_config(config_dir, "vae")),
        "scheduler": _scheduler_from_config(read_component_config(config_dir, "scheduler")),
    }
    for name in ("text_encoder", "text_encoder_2"):
        if name in index:
            config = transformers.CLIPTextConfig.from_pretrained(config_dir / name)
            parts[name] = getattr(transformers, index[name][1])(config)
            tok = name.replace("text_encoder", "tokenizer")
            parts[tok] = CLIPTokenizer.from_pretrained(config_dir / tok)
    return _make_pipeline(index["_class_name"], parts)


def _scheduler_from_config(config: dict):
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


def _make_pipeline(class_name: str, parts: dict):
    import diffusers

    cls = getattr(diffusers, class_name)
    if class_name == "StableDiffusionPipeline":
        parts = {**parts, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return cls(**parts)
