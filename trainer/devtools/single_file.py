"""Export a diffusers pipeline folder to the original single-file checkpoint layout.

Used to produce realistic test inputs for :mod:`trainer.checkpoints` (users
bring single files). ``.safetensors`` by default; ``.ckpt``/``.pt`` write
``{"state_dict": ...}`` with ``torch.save`` so the pickle loading path can be
tested too.
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.checkpoints.clip_vocab import REAL_VOCAB_SIZE
from trainer.checkpoints.detect import detect_diffusers_folder
from trainer.checkpoints.infer import SIDECAR_SUFFIX
from trainer.checkpoints.layouts import SD2
from trainer.checkpoints.ldm_keys import LDM_PREFIXES, SINGLE_FILE_LAYOUTS, to_ldm


def save_single_file(pipeline_dir, out_path, dtype=None) -> Path:
    """Write the pipeline in ``pipeline_dir`` as one LDM/SGM-layout checkpoint file."""
    pipeline_dir, out_path = Path(pipeline_dir), Path(out_path)
    family = detect_diffusers_folder(pipeline_dir).family  # the single-file layout it maps to
    if family is None:
        raise ValueError(f"{pipeline_dir} is not a Stable Diffusion pipeline folder")
    weights = {name: read_component_weights(pipeline_dir / name) for name in SINGLE_FILE_LAYOUTS[family]}
    state_dict = single_file_state_dict(weights, family)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    _write(state_dict, out_path)
    _write_tokenizer_sidecar(pipeline_dir, out_path)
    return out_path


def single_file_state_dict(weights: dict[str, dict], family: str) -> dict:
    """diffusers component name -> state dict, to one single-file state dict of ``family``'s layout."""
    state_dict = {}
    for component, (prefix, plan_builder) in SINGLE_FILE_LAYOUTS[family].items():
        tensors = weights[component]
        for entry in plan_builder(tensors, prefix=prefix):
            state_dict[entry.ldm] = to_ldm(entry, [tensors[k] for k in entry.diffusers])
    for add_tensors in EXTRA_TENSORS.get(family, ()):
        state_dict.update(add_tensors(state_dict))
    return state_dict


def read_component_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def _sd2_dropped_tensors(state_dict: dict, prefix: str = LDM_PREFIXES["openclip"]) -> dict:
    """Real SD2 files hold one more text layer and a text projection that diffusers drops.

    The export writes them too (a copy of the last layer, an identity projection)
    so tests see the real layout, including the extra layer.
    """
    import torch

    layers = {int(k[len(prefix):].split(".")[2]) for k in state_dict if k.startswith(prefix + "transformer.resblocks.")}
    last = max(layers)
    source = f"{prefix}transformer.resblocks.{last}."
    extra = {
        f"{prefix}transformer.resblocks.{last + 1}.{k[len(source):]}": v.clone()
        for k, v in state_dict.items() if k.startswith(source)
    }
    width = state_dict[prefix + "ln_final.weight"].shape[0]
    final_norm = state_dict[prefix + "ln_final.weight"]
    extra[prefix + "text_projection"] = torch.eye(width, dtype=final_norm.dtype, device=final_norm.device)
    return extra


# layout -> functions adding tensors that real files of that layout carry beyond what diffusers uses
EXTRA_TENSORS = {SD2: (_sd2_dropped_tensors,)}


def _write_tokenizer_sidecar(pipeline_dir: Path, out_path: Path) -> None:
    """Tokenizers of non-CLIP vocabularies go next to the file (see trainer.checkpoints.infer)."""
    import shutil

    sidecar = Path(str(out_path) + SIDECAR_SUFFIX)
    shutil.rmtree(sidecar, ignore_errors=True)
    for encoder in ("text_encoder", "text_encoder_2"):
        config_path = pipeline_dir / encoder / "config.json"
        if config_path.exists() and json.loads(config_path.read_text())["vocab_size"] != REAL_VOCAB_SIZE:
            tokenizer = encoder.replace("text_encoder", "tokenizer")
            shutil.copytree(pipeline_dir / tokenizer, sidecar / tokenizer)


def _write(state_dict: dict, out_path: Path) -> None:
    import torch

    out_path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(out_path), metadata={"format": "pt"})
    elif out_path.suffix in {".ckpt", ".pt", ".pth"}:
        torch.save({"state_dict": state_dict}, out_path)
    else:
        raise ValueError(f"unsupported checkpoint extension {out_path.suffix!r} (use .safetensors or .ckpt)")
