"""Save loaded models as one original-layout (LDM/SGM) checkpoint file, as A1111 and ComfyUI load it.

The key maps are :mod:`trainer.checkpoints.ldm_keys` (the same ones the loader
uses backwards), so a file written here loads back through
``load_pipeline_components`` tensor for tensor. Tensors a real file of the family
carries but diffusers does not use are kept from the base file when there is one,
or made up as sd-scripts does (SD2's last text-encoder layer and projection).
Writes are atomic (:func:`trainer.safety.atomic_write`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from trainer.checkpoints.layouts import SD2
from trainer.checkpoints.ldm_keys import LDM_PREFIXES, SINGLE_FILE_LAYOUTS, key_candidates, to_ldm
from trainer.safety import atomic_write

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
# Keys of a base file that are not carried into a new file: EMA copies would be stale after a merge.
DROPPED_PREFIXES = ("model_ema.",)


def original_layout_state_dict(weights: dict[str, dict[str, torch.Tensor]], family: str) -> dict[str, torch.Tensor]:
    """diffusers component name ("unet", "vae", "text_encoder", ...) -> state dict, to one single-file state dict."""
    state_dict = {}
    for component, (prefix, plan_builder) in SINGLE_FILE_LAYOUTS[family].items():
        tensors = weights[component]
        for entry in plan_builder(tensors, prefix=prefix):
            state_dict[entry.ldm] = to_ldm(entry, [tensors[k] for k in entry.diffusers])
    return state_dict


def components_state_dict(components) -> dict[str, torch.Tensor]:
    """A :class:`trainer.checkpoints.Components` as a single-file state dict (tensors share the models' memory)."""
    names = list(SINGLE_FILE_LAYOUTS[components.family])
    models = {"unet": components.unet, "vae": components.vae}
    models.update(zip([n for n in names if n.startswith("text_encoder")], components.text_encoders))
    weights = {name: {k: v.detach() for k, v in model.state_dict().items()} for name, model in models.items()}
    return original_layout_state_dict(weights, components.family)


def carry_extra_tensors(state_dict: dict, base_file) -> dict[str, torch.Tensor]:
    """Tensors of ``base_file`` that the key maps do not produce (SD2's 24th text layer, ``v_pred`` markers...)."""
    from trainer.checkpoints.reader import TensorSource

    produced = {alias for key in state_dict for alias in key_candidates(key)}
    extra = {}
    with TensorSource(base_file) as source:
        for key in source.keys():
            if key not in produced and not key.startswith(DROPPED_PREFIXES):
                extra[key] = source.get(key)
    return extra


def sd2_made_up_tensors(state_dict: dict, prefix: str = LDM_PREFIXES["openclip"]) -> dict[str, torch.Tensor]:
    """What real SD2 files hold beyond diffusers' 23 text layers, made up as sd-scripts does.

    SD2 conditions on the penultimate layer, so the last layer (a copy of the one
    before) and the projection (identity) are never used; loaders expect them.
    """
    layers = {int(k[len(prefix):].split(".")[2]) for k in state_dict if k.startswith(prefix + "transformer.resblocks.")}
    last = max(layers)
    source = f"{prefix}transformer.resblocks.{last}."
    extra = {f"{prefix}transformer.resblocks.{last + 1}.{k[len(source):]}": v.clone()
             for k, v in state_dict.items() if k.startswith(source)}
    norm = state_dict[prefix + "ln_final.weight"]
    extra[prefix + "text_projection"] = torch.eye(norm.shape[0], dtype=norm.dtype)
    return extra


# family -> tensors to make up when the base is not a single file of that family
MADE_UP_TENSORS = {SD2: sd2_made_up_tensors}


def complete_state_dict(state_dict: dict, family: str, base_path) -> dict[str, torch.Tensor]:
    """Add what a real file of ``family`` carries: from the base file, or made up."""
    base_path = Path(base_path)
    if base_path.is_file():
        state_dict.update(carry_extra_tensors(state_dict, base_path))
    elif family in MADE_UP_TENSORS:
        state_dict.update(MADE_UP_TENSORS[family](state_dict))
    return state_dict


def cast_floats(state_dict: dict, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state_dict
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def save_checkpoint(state_dict: dict, path, metadata: dict[str, str] | None = None) -> Path:
    """``.safetensors`` (with metadata) or ``.ckpt`` (``{"state_dict": ...}``, no metadata), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"unsupported checkpoint extension {path.suffix!r}; use .safetensors or .ckpt")
    tensors = {k: v.contiguous() for k, v in state_dict.items()}

    def write(tmp: str) -> None:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
        else:
            torch.save({"state_dict": tensors}, tmp)
        os.chmod(tmp, 0o666 & ~_umask())

    atomic_write(path, write)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_tokenizer_sidecar(components, out_path) -> Path | None:
    """Tokenizers of a model whose vocabulary is not CLIP's go next to its file as ``<file>.tokenizers/``.

    Real SD models use CLIP's vocabulary and need nothing; the loader finds a sidecar
    for anything else (:mod:`trainer.checkpoints.infer`), so a merged custom model loads
    like its base did.
    """
    from trainer.checkpoints.clip_vocab import REAL_VOCAB_SIZE
    from trainer.checkpoints.infer import SIDECAR_SUFFIX

    custom = [(i, tok) for i, tok in enumerate(components.tokenizers) if len(tok) != REAL_VOCAB_SIZE]
    if not custom:
        return None
    sidecar = Path(str(out_path) + SIDECAR_SUFFIX)
    staging = Path(tempfile.mkdtemp(prefix=sidecar.name + ".", dir=sidecar.parent))
    try:
        for index, tokenizer in custom:
            folder = "tokenizer" if index == 0 else f"tokenizer_{index + 1}"
            _copy_tokenizer_folder(components.config_dir / folder, staging / folder, tokenizer)
        shutil.rmtree(sidecar, ignore_errors=True)
        os.replace(staging, sidecar)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sidecar


def _copy_tokenizer_folder(source: Path, target: Path, tokenizer) -> None:
    if source.is_dir():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    else:  # tokenizer loaded from elsewhere: save the object itself
        tokenizer.save_pretrained(target)
    config = target / "tokenizer_config.json"
    if config.exists():  # keep the 77-token limit explicit (transformers 5 defaults to 1e30)
        data = json.loads(config.read_text())
        data.setdefault("model_max_length", 77)
        config.write_text(json.dumps(data, indent=2))
