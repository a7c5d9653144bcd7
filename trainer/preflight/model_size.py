"""The base model's real parameter counts for the memory estimate, read from .safetensors headers.

Only the JSON headers are read (no weights, no torch): a single file's tensors are summed by
their component prefix (``model.diffusion_model.`` ...), a diffusers folder's by the files the loader
reads for each component (``trainer.checkpoints.weight_files``; a ``.bin`` component keeps its nominal size).
The file's dtype does not matter: the trainer casts the frozen weights to the run's precision.
A ``.ckpt`` is not opened for this (it would mean unpickling it), so it keeps the family's nominal size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.checkpoints.integrity import read_safetensors_header
from trainer.checkpoints.ldm_keys import SINGLE_FILE_LAYOUTS
from trainer.checkpoints.weight_files import component_weight_files
from trainer.families import FamilySpec

DIFFUSERS_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # SD3: T5-XXL is the third
DENOISER_PREFIX = "model.diffusion_model."  # a full file's denoiser (SAI's SD3 files keep text_encoders.* beside it)

_cache: dict[tuple, "ModelSize"] = {}


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts per component, or None where the nominal family figures apply (``note`` says why)."""

    unet: int | None
    text_encoders: tuple[int, ...]
    vae: int | None
    note: str

    def apply_to(self, family: FamilySpec) -> FamilySpec:
        """The family with its nominal parameter counts replaced by the ones counted in the file."""
        if self.unet is None:
            return family
        return replace(family, unet_params=self.unet, vae_params=self.vae or family.vae_params,
                       text_encoder_params=self.text_encoders or family.text_encoder_params)


def model_size(model_value: str, family: FamilySpec) -> ModelSize:
    """The counts of the model ``pretrained_model_name_or_path`` names, cached by (path, mtime, size)."""
    from trainer.preflight.model import ModelPathProblem, resolve_model_path

    nominal = f"{family.label}'s nominal size"
    try:
        path = resolve_model_path(model_value.strip()) if model_value.strip() else None
    except ModelPathProblem:
        path = None
    if path is None:
        return ModelSize(None, (), None, f"base model: {nominal} (the model file could not be found)")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, family.name)
    if key not in _cache:
        _cache[key] = _count(path, family, nominal)
    return _cache[key]


def part_files_counted(settings, family: FamilySpec) -> FamilySpec:
    """The family with the parameter counts of the separate text-encoder and VAE files its settings name (FLUX.1's
    clip_l, t5xxl, ae), where their .safetensors headers can be read; the nominal counts otherwise."""
    encoders = [_file_params(getattr(settings, key, "")) for key in family.text_encoder_file_settings]
    vae = _file_params(getattr(settings, family.vae_file_setting, "")) if family.vae_file_setting else None
    if any(count is not None for count in encoders):
        counted = tuple(c if c is not None else nominal for c, nominal in zip(encoders, family.text_encoder_params))
        family = replace(family, text_encoder_params=counted)
    return replace(family, vae_params=vae) if vae else family


def _file_params(value) -> int | None:
    path = Path(str(value or "").strip()).expanduser()
    if not str(value or "").strip() or path.suffix.lower() not in (".safetensors", ".sft") or not path.is_file():
        return None
    try:
        return sum(math.prod(shape) for shape in read_safetensors_header(path).shapes.values())
    except (OSError, ValueError, KeyError, TypeError):  # the Flux file checks name an unreadable file
        return None


def _count(path: Path, family: FamilySpec, nominal: str) -> ModelSize:
    try:
        if path.is_dir():
            size = _diffusers_counts(path)
        elif path.suffix.lower() == ".safetensors":
            size = _single_file_counts(path, family)
        else:
            return ModelSize(None, (), None, f"base model: {nominal} ({path.suffix} files are not opened to count "
                                             "their weights; a .safetensors file is)")
    except (OSError, ValueError, KeyError, TypeError):  # the model checks report an unreadable file
        return ModelSize(None, (), None, f"base model: {nominal} (its file could not be read)")
    if size is None:
        return ModelSize(None, (), None, f"base model: {nominal} (no UNet weights found in its .safetensors files)")
    return size


def _single_file_counts(path: Path, family: FamilySpec) -> ModelSize | None:
    shapes = read_safetensors_header(path).shapes
    if family.layout not in SINGLE_FILE_LAYOUTS:  # a transformer file (FLUX.1), or one with its encoders (SD3)
        denoiser = {k: v for k, v in shapes.items() if k.startswith(DENOISER_PREFIX)} or shapes
        return _size({"unet": sum(math.prod(shape) for shape in denoiser.values())}, f"from {path.name}'s header")
    counts = {component: sum(math.prod(shape) for key, shape in shapes.items() if key.startswith(prefix))
              for component, (prefix, _) in SINGLE_FILE_LAYOUTS[family.layout].items()}
    return _size(counts, f"from {path.name}'s header")


def _diffusers_counts(folder: Path) -> ModelSize | None:
    counts = {}
    for component in ("unet", "transformer", "vae", *DIFFUSERS_TEXT_ENCODERS):
        if not (folder / component).is_dir():
            continue
        files = [f for f in component_weight_files(folder / component) if f.suffix.lower() == ".safetensors"]
        counts[component] = sum(math.prod(shape) for f in files for shape in read_safetensors_header(f).shapes.values())
    counts["unet"] = counts.get("unet") or counts.get("transformer", 0)  # a transformer denoiser (FLUX.1)
    return _size(counts, f"from the .safetensors headers in {folder.name}")


def _size(counts: dict[str, int], source: str) -> ModelSize | None:
    if not counts.get("unet"):
        return None
    encoders = tuple(counts[name] for name in DIFFUSERS_TEXT_ENCODERS if counts.get(name))
    total = counts["unet"] + sum(encoders) + counts.get("vae", 0)
    return ModelSize(counts["unet"], encoders, counts.get("vae") or None,
                     f"base model: {total / 1e6:,.1f} M parameters, counted {source}")
