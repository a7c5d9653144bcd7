"""Merge LoRAs into a base model and save an original-layout checkpoint (A1111's "Generate Ckpt").

Each module adds ``ratio · alpha/rank · up @ down`` to its layer's weight, in
float32 (sd-scripts' merge_lora), on the same layers the trainer names, so the
merged model equals the base with the LoRAs applied at those ratios. A LyCORIS
module (LoHa, LoKr, iA3, OFT...) adds its own weight change, as LyCORIS rebuilds
it on that layer (trainer.tools.lycoris_file.weight_delta). The result
is written as one ``.safetensors`` (or ``.ckpt``) file in the original SD layout;
``half`` saves fp16.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from trainer.families import family_spec
from trainer.tools.errors import ToolError, check_output_path
from trainer.tools.lora_file import LoraFile, fit_to_layer, read_lora, shapes_fit

HALF = torch.float16
# ModelSpec implementation of an original-layout (LDM/SGM) checkpoint, whatever the family
ORIGINAL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


@dataclass(frozen=True)
class LoraToMerge:
    path: str
    ratio: float = 1.0


@dataclass
class MergedLora:
    path: str
    ratio: float
    merged: int  # modules added to the model
    unmatched: list[str] = field(default_factory=list)  # modules with no layer in the base model (skipped)


@dataclass
class MergeResult:
    base: str
    family: str
    out_path: str
    loras: list[MergedLora]
    dtype: str
    tensors: int
    seconds: float
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        merged = ", ".join(f"{Path(m.path).name} ×{m.ratio:g} ({m.merged} modules)" for m in self.loras)
        return f"merged {merged} into {family_spec(self.family).short_label} model {Path(self.base).name}"

    def format(self) -> str:
        lines = [f"Merged checkpoint {self.out_path}", f"  {self.summary()}",
                 f"  {self.tensors} tensors, {self.dtype}, {self.seconds:.1f} s"]
        for lora in self.loras:
            if lora.unmatched:
                lines.append(f"  skipped {len(lora.unmatched)} modules of {Path(lora.path).name} that match no layer, "
                             f"e.g. {lora.unmatched[0]}")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return asdict(self)


def as_loras(loras) -> list[LoraToMerge]:
    """Accept LoraToMerge, (path, ratio) pairs or bare paths (ratio 1)."""
    out = []
    for item in loras:
        if isinstance(item, LoraToMerge):
            out.append(item)
        elif isinstance(item, (tuple, list)):
            out.append(LoraToMerge(str(item[0]), float(item[1])))
        else:
            out.append(LoraToMerge(str(item)))
    if not out:
        raise ToolError("choose at least one LoRA to merge")
    return out


def merge_into_checkpoint(base, loras: Sequence, out_path, *, half: bool = False, allow_unmatched: bool = False,
                          v_parameterization: bool | None = None, overwrite: bool = False,
                          log: Callable[[str], None] | None = None) -> MergeResult:
    """Merge ``loras`` ((path, ratio) pairs) into ``base`` and save the checkpoint at ``out_path``.

    Every module must match a layer of the base with the right shape; with
    ``allow_unmatched`` modules that match no layer are skipped and reported (A1111's
    behaviour); a wrong shape is always an error (the LoRA is for another model).
    """
    from trainer.checkpoints import load_pipeline_components
    from trainer.tools.checkpoint_file import (
        cast_floats, complete_state_dict, components_state_dict, save_checkpoint, write_tokenizer_sidecar,
    )
    from trainer.tools.layer_index import model_layers

    started, log = time.perf_counter(), log or (lambda message: None)
    wanted = as_loras(loras)
    out = check_output_path(out_path, (".safetensors", ".ckpt"), inputs=[base, *(w.path for w in wanted)],
                            overwrite=overwrite)
    files = [read_lora(w.path) for w in wanted]
    own = _denoiser_only(base)
    if own is not None:  # a family saved as its denoiser alone (FLUX.1's transformer file)
        return _merge_into_denoiser(base, own, wanted, files, out, half, allow_unmatched, log, started)
    log(f"loading {base}")
    components = load_pipeline_components(base, dtype=torch.float32, v_parameterization=v_parameterization)
    modules = model_layers(components.family, components.unet, components.text_encoders)
    plans = [_plan(file, modules, allow_unmatched) for file in files]
    merged = []
    with torch.no_grad():
        for want, file, (layers, unmatched, built) in zip(wanted, files, plans):
            log(f"merging {file.path.name} at ratio {want.ratio:g} ({len(layers)} modules)")
            for name, layer in layers.items():
                _add_delta(file, name, layer.module, want.ratio, built.get(name))
            merged.append(MergedLora(str(file.path), want.ratio, len(layers), unmatched))
    state_dict = complete_state_dict(components_state_dict(components), components.family, components.info.path)
    dtype = HALF if half else torch.float32
    metadata = merged_metadata(components, merged, out, v_parameterization)
    log(f"saving {out}")
    save_checkpoint(cast_floats(state_dict, dtype), out, metadata)
    write_tokenizer_sidecar(components, out)
    return MergeResult(str(base), components.family, str(out), merged, str(dtype).replace("torch.", ""),
                       len(state_dict), time.perf_counter() - started, metadata)


def _denoiser_only(base):
    """(family spec, loader) when the base model's family merges into its denoiser alone, else None."""
    from trainer.checkpoints import detect, resolve_model_path
    from trainer.families import spec_for_checkpoint

    spec = spec_for_checkpoint(detect(resolve_model_path(base)).require_usable().family)
    loader = getattr(spec.adapter_class(), "denoiser_for_merge", None)
    return None if loader is None else (spec, loader)


def _merge_into_denoiser(base, own, wanted, files, out: Path, half: bool, allow_unmatched: bool, log,
                         started: float) -> MergeResult:
    """Merge into the denoiser and save it alone, in its own layout; text-encoder modules match no layer here."""
    from trainer.network.metadata import MODELSPEC_VERSION
    from trainer.tools.base_modules import family_adapter
    from trainer.tools.checkpoint_file import cast_floats, save_checkpoint
    from trainer.tools.layer_index import model_layers

    spec, loader = own
    log(f"loading {base}")
    denoiser = loader(base)
    modules = model_layers(spec.key, denoiser, ())
    merged = []
    with torch.no_grad():
        for want, file in zip(wanted, files):
            layers, unmatched, built = _plan(file, modules, allow_unmatched)
            log(f"merging {file.path.name} at ratio {want.ratio:g} ({len(layers)} modules)")
            for name, layer in layers.items():
                _add_delta(file, name, layer.module, want.ratio, built.get(name))
            merged.append(MergedLora(str(file.path), want.ratio, len(layers), unmatched))
    version = family_adapter(spec.key, denoiser, ()).version_metadata()
    metadata = {"modelspec.sai_model_spec": MODELSPEC_VERSION, "modelspec.architecture": version.architecture,
                "modelspec.implementation": version.implementation, "modelspec.title": out.stem,
                "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
                "modelspec.description": "Nekoya merge: " + ", ".join(f"{Path(m.path).name} x{m.ratio:g}" for m in merged)}
    state_dict = denoiser.state_dict()
    dtype = HALF if half else torch.float32
    log(f"saving {out}")
    save_checkpoint(cast_floats(state_dict, dtype), out, metadata)
    return MergeResult(str(base), spec.key, str(out), merged, str(dtype).replace("torch.", ""), len(state_dict),
                       time.perf_counter() - started, metadata)


def _add_delta(file: LoraFile, name: str, layer, ratio: float, lycoris_module) -> None:
    """Add the module's weight change at ``ratio`` to the layer (LyCORIS types: from its current weight, as
    earlier LoRAs left it)."""
    from trainer.tools.lycoris_file import weight_delta

    weight = layer.weight
    if lycoris_module is None:
        weight += fit_to_layer(file.modules[name].delta(ratio), weight.shape).to(weight.dtype)
        return
    delta, bias = weight_delta(lycoris_module, ratio)
    weight += delta.to(weight.dtype)
    if bias is not None and layer.bias is not None:
        layer.bias += bias.to(layer.bias.dtype)


def _plan(file: LoraFile, modules, allow_unmatched: bool) -> tuple[dict, list[str], dict]:
    """(name -> target layer, unmatched names, name -> LyCORIS module rebuilt on its layer) for ``file``;
    raises on wrong shapes (and on unmatched names)."""
    layers, unmatched, wrong, built = {}, [], [], {}
    for name in file.names():
        layer = modules.find(name)
        if layer is None:
            unmatched.append(name)
            continue
        problem = _misfit(file, name, layer.module, built)
        if problem:
            wrong.append(problem)
        else:
            layers[name] = layer
    family = family_spec(modules.family).short_label
    if wrong:
        raise ToolError(f"{file.path.name} does not fit this {family} model: {len(wrong)} modules have another "
                        f"shape, e.g. {wrong[0]}. Is it a LoRA for another model family?")
    if not layers:
        raise ToolError(f"{file.path.name}: none of its {len(file.names())} modules match a layer of this {family} "
                        f"model (e.g. {unmatched[0]}). Is it a LoRA for another model family?")
    if unmatched and not allow_unmatched:
        raise ToolError(f"{file.path.name}: {len(unmatched)} of {len(file.names())} modules match no layer of this "
                        f"{family} model (e.g. {unmatched[0]}); allow unmatched modules to merge the rest")
    return layers, unmatched, built


def _misfit(file: LoraFile, name: str, layer, built: dict) -> str | None:
    """Why the module does not fit ``layer`` (for the error message), else None."""
    from trainer.tools.lycoris_file import LycorisModuleError, rebuild

    module = file.modules.get(name)
    if module is not None:
        shape = list(layer.weight.shape)
        return None if shapes_fit(module.delta_shape(), shape) else \
            f"{name} (ΔW {list(module.delta_shape())}, layer {shape})"
    try:
        built[name] = rebuild(file.lycoris[name], layer)
    except LycorisModuleError as exc:
        return str(exc)
    return None


def merged_metadata(components, merged: list[MergedLora], out: Path, v_parameterization: bool | None) -> dict[str, str]:
    """SAI ModelSpec keys of the checkpoint; the prediction type only when it is known."""
    from trainer.network.metadata import MODELSPEC_VERSION
    from trainer.tools.base_modules import family_adapter

    version = family_adapter(components.family, components.unet, components.text_encoders,
                             components.v_parameterization).version_metadata()
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": version.architecture,
        "modelspec.implementation": ORIGINAL_IMPLEMENTATION,
        "modelspec.title": out.stem,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.description": "Nekoya merge: " + ", ".join(f"{Path(m.path).name} x{m.ratio:g}" for m in merged),
    }
    known = v_parameterization is not None or components.info.v_parameterization is not None \
        or components.info.format == "diffusers"
    if known:
        meta["modelspec.prediction_type"] = version.prediction_type
    return meta
