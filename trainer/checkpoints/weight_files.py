"""Which weights files of a diffusers folder are loaded: the one rule the model check, the size
estimate, detection and the loader all follow (torch-free).

A component folder (``unet/``, ``vae/``, ``text_encoder/`` ...) holds its weights as
``diffusion_pytorch_model.safetensors`` (diffusers) or ``model.safetensors`` (transformers),
possibly sharded behind an index (``diffusion_pytorch_model.safetensors.index.json``, whose
``weight_map`` names the shards), possibly only as an ``fp16`` variant
(``diffusion_pytorch_model.fp16.safetensors``, ``....safetensors.index.fp16.json``: diffusers'
names), or as a legacy ``.bin`` pickle. The loader reads the first of: .safetensors before .bin
(even an fp16 variant before a plain .bin: no pickle is opened where a safe file holds the weights),
then the plain file before its variant (a variant holds the same weights again), then a single file
before an index (transformers' order; diffusers looks for the index first, but a folder holds one or
the other). Anything else in the folder (``*.non_ema.safetensors``, stray copies) is not loaded, so
it is neither checked nor counted.
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.checkpoints.ldm_keys import SINGLE_FILE_LAYOUTS
from trainer.problems import NekoyaError

STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
SUFFIXES = (".safetensors", ".bin")
VARIANTS = ("", ".fp16")
# The pipeline components Nekoya loads (unet, vae, text_encoder, text_encoder_2); others are never opened.
LOADED_COMPONENTS = tuple(dict.fromkeys(name for layout in SINGLE_FILE_LAYOUTS.values() for name in layout))


class UnreadableIndex(NekoyaError, ValueError):
    """A shard index that names no readable list of files; ``problem`` follows the index's name in messages."""

    def __init__(self, index: Path, problem: str) -> None:
        super().__init__(f"{index} {problem}")
        self.index, self.problem, self.file = index, problem, str(index)


def component_weight_files(folder: Path) -> list[Path]:
    """The files the loader reads for one component folder; [] when it has none. A sharded index's
    shards are listed whether or not they exist. Raises UnreadableIndex (a ValueError)."""
    folder = Path(folder)
    for suffix in SUFFIXES:
        for variant in VARIANTS:
            for stem in STEMS:
                single = folder / f"{stem}{variant}{suffix}"
                if single.is_file():
                    return [single]
                index = folder / f"{stem}{suffix}.index{variant}.json"
                if index.is_file():
                    return _shards(index)
    return []


def pipeline_weight_files(folder: Path) -> list[Path]:
    """The files the loader reads for every loaded component of the pipeline folder ``folder``."""
    return [file for name in LOADED_COMPONENTS if (Path(folder) / name).is_dir()
            for file in component_weight_files(Path(folder) / name)]


def _shards(index: Path) -> list[Path]:
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnreadableIndex(index, f"is not a readable index of weight shards ({type(exc).__name__}: {exc})") from exc
    if not shards or not all(isinstance(shard, str) for shard in shards):
        raise UnreadableIndex(index, "is not a readable index of weight shards (its weight_map names no files)")
    return [index.parent / shard for shard in shards]
