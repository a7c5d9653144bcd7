"""Config folders for single-file checkpoints: a shipped one, or one inferred from tensor shapes.

:func:`infer_config_dir` returns a diffusers config-only folder (configs,
tokenizers, scheduler; no weights) describing a single file. Standard SD1.5,
SD2.x and SDXL-base shaped files get the shipped folder (exact official values);
anything else (pruned, custom, tiny) gets a folder written to the cache, starting
from the family's official configs and overriding what the shapes reveal.

Tokenizers: files with CLIP's 49408-token vocabulary use the real vocabulary.
For any other vocabulary size pass ``tokenizer_dir``: a folder with
``tokenizer/`` (and ``tokenizer_2/`` for SDXL) sub-folders, like a diffusers
folder, or one tokenizer folder used for every encoder. When it is not given,
the sidecar ``<checkpoint file>.tokenizers/`` is used if it exists (this is what
``trainer.devtools.synthetic.save_single_file`` writes for tiny models).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from trainer.checkpoints import shapes as arch
from trainer.checkpoints.clip_vocab import REAL_VOCAB_SIZE
from trainer.checkpoints.detect import detect
from trainer.checkpoints.errors import CheckpointError
from trainer.checkpoints.layouts import SD1, SD2, SDXL
from trainer.checkpoints.reader import TensorSource
from trainer.checkpoints.shipped import (
    build_config_folder, cache_root, read_component_config, shipped_config_dir, shipped_config_source,
)

# layout -> v_parameterization -> shipped config that is the starting point
BASE_CONFIGS = {
    SD1: {False: "sd15", True: "sd15"},
    SD2: {False: "sd21_base", True: "sd21"},
    SDXL: {False: "sdxl_base", True: "sdxl_base"},
}
PREDICTION_TYPES = {False: "epsilon", True: "v_prediction"}
SIDECAR_SUFFIX = ".tokenizers"


def infer_config_dir(path, tokenizer_dir=None, v_parameterization: bool | None = None) -> Path:
    """A loadable config folder for the single file at ``path``.

    ``v_parameterization``: the user's setting; None means "what the file says",
    and epsilon when the file does not say (as kohya's default).
    """
    path = Path(path)
    family, base_name, configs, scheduler = _describe(path, v_parameterization)
    if tokenizer_dir is None and _matches_base(base_name, configs, scheduler):
        return shipped_config_dir(base_name)
    base = shipped_config_source(base_name)
    tokenizers = _tokenizer_sources(path, configs, base_name, tokenizer_dir)
    _set_token_ids(configs, tokenizers)
    return _write_custom_folder(base, configs, scheduler, tokenizers)


def matching_shipped_config(path, v_parameterization: bool | None = None) -> str | None:
    """Name of the shipped config whose architecture the file has exactly, else None (custom)."""
    _, base_name, configs, scheduler = _describe(Path(path), v_parameterization)
    return base_name if _matches_base(base_name, configs, scheduler) else None


def _describe(path: Path, v_parameterization: bool | None):
    """(family, base config name, component configs, scheduler config) for a single file."""
    info = detect(path).require_usable()
    v_param = bool(info.v_parameterization) if v_parameterization is None else v_parameterization
    base_name = BASE_CONFIGS[info.family][v_param]
    base = shipped_config_source(base_name)
    with TensorSource(path) as source:
        inferred = arch.infer_components(source.shapes(), info.family)
    configs = {name: {**read_component_config(base, name), **values} for name, values in inferred.items()}
    scheduler = {**read_component_config(base, "scheduler"), "prediction_type": PREDICTION_TYPES[v_param]}
    return info.family, base_name, configs, scheduler


def _matches_base(base_name: str, configs: dict, scheduler: dict) -> bool:
    base = shipped_config_source(base_name)
    if scheduler["prediction_type"] != read_component_config(base, "scheduler").get("prediction_type", "epsilon"):
        return False
    return all(arch.same_config(read_component_config(base, name), config) for name, config in configs.items())


# ---- tokenizers ----------------------------------------------------------------------------

def _tokenizer_sources(path: Path, configs: dict, base_name: str, tokenizer_dir) -> dict[str, Path]:
    """tokenizer sub-folder name -> folder to copy it from."""
    names = [name.replace("text_encoder", "tokenizer") for name in configs if name.startswith("text_encoder")]
    if all(configs[n.replace("tokenizer", "text_encoder")]["vocab_size"] == REAL_VOCAB_SIZE for n in names) and tokenizer_dir is None:
        real = shipped_config_dir(base_name)
        return {name: real / name for name in names}
    folder = Path(tokenizer_dir) if tokenizer_dir is not None else Path(str(path) + SIDECAR_SUFFIX)
    if not folder.is_dir():
        sizes = sorted({configs[n]["vocab_size"] for n in configs if n.startswith("text_encoder")})
        raise CheckpointError(
            f"{path.name} has a text encoder vocabulary of {sizes} tokens, not CLIP's {REAL_VOCAB_SIZE}; "
            f"pass the matching tokenizer folder (tokenizer_dir=...), or put it next to the file as {folder.name}/"
        )
    return {name: folder / name if (folder / name).is_dir() else folder for name in names}


def _set_token_ids(configs: dict, tokenizers: dict[str, Path]) -> None:
    """Custom vocabularies: take bos/eos/pad ids from the tokenizer (the official configs' ids are CLIP's)."""
    from trainer.models.clip_tokenizer import CLIPTokenizer

    for name, folder in tokenizers.items():
        config = configs[name.replace("tokenizer", "text_encoder")]
        if config["vocab_size"] == REAL_VOCAB_SIZE:
            continue
        tok = CLIPTokenizer.from_pretrained(folder)
        config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


# ---- writing -------------------------------------------------------------------------------

def _write_custom_folder(base: Path, configs: dict, scheduler: dict, tokenizers: dict[str, Path]) -> Path:
    files = {"model_index.json": json.loads((base / "model_index.json").read_text())}
    files.update({f"{name}/config.json": config for name, config in configs.items()})
    files["scheduler/scheduler_config.json"] = scheduler
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode())
    for name, folder in sorted(tokenizers.items()):
        for file in sorted(p for p in folder.iterdir() if p.is_file()):
            digest.update(name.encode() + file.name.encode() + file.read_bytes())
    target = cache_root() / "inferred" / digest.hexdigest()[:16]
    if (target / "model_index.json").exists():
        return target

    def fill(staging: Path) -> None:
        for relative, data in files.items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        for name, folder in tokenizers.items():
            shutil.copytree(folder, staging / name, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))

    build_config_folder(target, fill)
    return target
