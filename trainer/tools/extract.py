"""Extract a LoRA from the difference between a fine-tuned model and its base (sd-scripts' extract_lora_from_models).

For each layer the trainer would put a LoRA on, ΔW = tuned − base is decomposed by
SVD and its top ``rank`` directions become ``up = U·S``, ``down = Vh`` with alpha =
rank (scale 1). 3x3 convs are included when ``conv_rank`` is given (LoCon). As in
sd-scripts, the text encoders are left out when no weight differs by more than
``min_diff``, and factor values beyond the ``clamp_quantile`` of their magnitudes
are clamped (None turns that off). The result is always a LoRA/LoCon file (lora_down/lora_up): extract
writes no LyCORIS types, and refuses a LoRA or LyCORIS file given as one of the models.
"""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from trainer.families import spec_for_checkpoint
from trainer.network.targets import Role
from trainer.tools.errors import ToolError, check_output_path
from trainer.tools.lora_file import LoraWeights, module_tensors
from trainer.tools.lowrank import top_factors
from trainer.tools.requests import ExtractRequest
from trainer.tools.resize import LORA_SUFFIXES, SAVE_PRECISIONS

DEFAULTS = ExtractRequest.model_construct()  # the declared defaults (the paths have none)
LOAD_PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModuleExtract:
    name: str
    kind: str
    rank: int
    relative_error: float  # ‖ΔW − up@down‖_F / ‖ΔW‖_F
    norm: float  # ‖ΔW‖_F


@dataclass
class ExtractResult:
    base: str
    tuned: str
    out_path: str
    family: str
    rank: int
    conv_rank: int | None
    modules: list[ModuleExtract]
    unchanged: int  # layers whose weights are identical in both models (no module written)
    text_encoder_max_diff: float  # largest |ΔW| of the text encoders
    text_encoder_included: bool
    overall_error: float
    dtype: str
    seconds: float
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        conv = f", conv rank {self.conv_rank}" if self.conv_rank else ""
        te = "with" if self.text_encoder_included else "without"
        return (f"extracted {len(self.modules)} modules at rank {self.rank}{conv} {te} the text encoder; "
                f"overall relative error {self.overall_error:.3%}")

    def format(self, modules: bool = False) -> str:
        lines = [f"Extracted LoRA {self.out_path}", f"  from {self.tuned} minus {self.base}", f"  {self.summary()}",
                 f"  {self.dtype}, {self.seconds:.1f} s"]
        if not self.text_encoder_included:
            lines.append(f"  text encoders differ by at most {self.text_encoder_max_diff:.3g} (min_diff), left out")
        if self.unchanged:
            lines.append(f"  {self.unchanged} layers are identical in both models and have no module")
        if modules:
            lines += [f"  {m.name}  {m.kind} r{m.rank} ‖ΔW‖ {m.norm:.4g} error {m.relative_error:.3%}"
                      for m in self.modules]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return asdict(self)


def extract_lora(base, tuned, out_path, rank: int = DEFAULTS.rank, *, conv_rank: int | None = None,
                 clamp_quantile: float | None = DEFAULTS.clamp, min_diff: float = DEFAULTS.min_diff,
                 save_precision: str | None = None,
                 load_precision: str = "float", device: str | None = None, overwrite: bool = False,
                 log: Callable[[str], None] | None = None) -> ExtractResult:
    """Write the LoRA that turns ``base`` into (approximately) ``tuned``.

    ``load_precision`` "fp16" halves the memory of the two loaded models (fine for fp16 checkpoints).
    """
    from trainer.checkpoints import load_pipeline_components
    from trainer.tools.base_modules import base_modules

    started, log = time.perf_counter(), log or (lambda message: None)
    _check_arguments(rank, conv_rank, clamp_quantile, save_precision, load_precision)
    out = check_output_path(out_path, LORA_SUFFIXES, inputs=[base, tuned], overwrite=overwrite)
    _refuse_lora_inputs(base, tuned)
    _check_same_family(base, tuned)
    dtype = LOAD_PRECISIONS[load_precision]
    log(f"loading {base}")
    original = load_pipeline_components(base, dtype=dtype)
    log(f"loading {tuned}")
    finetuned = load_pipeline_components(tuned, family_hint=original.family, dtype=dtype)
    with_conv = conv_rank is not None
    layers_o = base_modules(original.family, original.unet, original.text_encoders, with_conv).layers
    layers_t = base_modules(finetuned.family, finetuned.unet, finetuned.text_encoders, with_conv).layers
    _check_same_layers(layers_o, layers_t)
    te_names = [name for name, layer in layers_o.items() if layer.role is Role.TEXT_ENCODER]
    te_max = max((float(_difference(layers_o, layers_t, name).abs().max()) for name in te_names), default=0.0)
    include_te = te_max > min_diff
    names = [name for name in layers_o if include_te or name not in te_names]
    modules, infos, unchanged = [], [], 0
    log(f"decomposing {len(names)} layers")
    with torch.no_grad():
        for name in names:  # one difference at a time: SDXL's would take gigabytes together
            diff = _difference(layers_o, layers_t, name)
            if not diff.any():
                unchanged += 1
                continue
            target = conv_rank if diff.dim() == 4 and tuple(diff.shape[2:]) != (1, 1) else rank
            module, info = extract_module(name, diff, target, clamp_quantile, device)
            modules.append(module)
            infos.append(info)
    if not modules:
        raise ToolError(f"{Path(tuned).name} and {Path(base).name} have the same weights on every LoRA layer: "
                        "nothing to extract")
    save_dtype = SAVE_PRECISIONS[save_precision] if save_precision else torch.float32
    metadata = extract_metadata(original, out, base, tuned, rank, conv_rank)
    from trainer.saving import save_lora_file

    save_lora_file(str(out), module_tensors(modules, save_dtype), metadata)
    return ExtractResult(str(base), str(tuned), str(out), original.family, rank, conv_rank, infos, unchanged, te_max,
                         include_te, _overall(infos), str(save_dtype).replace("torch.", ""),
                         time.perf_counter() - started, metadata)


def _check_arguments(rank, conv_rank, clamp_quantile, save_precision, load_precision) -> None:
    if int(rank) < 1 or (conv_rank is not None and int(conv_rank) < 1):
        raise ToolError("the rank must be at least 1")
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise ToolError(f"clamp quantile must be in (0, 1], not {clamp_quantile}")
    if save_precision and save_precision not in SAVE_PRECISIONS:
        raise ToolError(f"unknown precision {save_precision!r}; choose {', '.join(SAVE_PRECISIONS)}")
    if load_precision not in LOAD_PRECISIONS:
        raise ToolError(f"unknown precision {load_precision!r}; choose {', '.join(LOAD_PRECISIONS)}")


def _refuse_lora_inputs(*models) -> None:
    """A LoRA or LyCORIS file given as one of the two models: say what extract takes and writes."""
    from trainer.tools.lycoris_file import lora_file_type

    for model in models:
        kind = lora_file_type(model)
        if kind:
            raise ToolError(f"{Path(model).name} is a {kind} file, not a model: extract takes two full models (the "
                            "base and its fine-tune) and writes a LoRA/LoCon file (lora_down/lora_up); it cannot "
                            "write LyCORIS types")


def _check_same_family(base, tuned) -> None:
    from trainer.checkpoints import detect, resolve_model_path

    families = [detect(resolve_model_path(p)).require_usable().family for p in (base, tuned)]
    if families[0] != families[1]:
        base_name, tuned_name = (spec_for_checkpoint(key).short_label for key in families)
        raise ToolError(f"{Path(tuned).name} is an {tuned_name} model but {Path(base).name} is "
                        f"{base_name}: extract needs a fine-tune and the base it was tuned from")


def _check_same_layers(layers_o: dict, layers_t: dict) -> None:
    """Both models must have the same LoRA layers with the same shapes."""
    if set(layers_o) != set(layers_t):
        missing = sorted(set(layers_o) ^ set(layers_t))
        raise ToolError(f"the two models have different layers (e.g. {missing[0]}); extract needs a fine-tune "
                        "of the base model with the same architecture")
    for name, layer in layers_o.items():
        before, after = layer.module.weight.shape, layers_t[name].module.weight.shape
        if before != after:
            raise ToolError(f"{name} has shape {list(after)} in the tuned model but {list(before)} "
                            "in the base: these are different architectures")


def _difference(layers_o: dict, layers_t: dict, name: str) -> torch.Tensor:
    """tuned − base weight of one layer, in float32."""
    return layers_t[name].module.weight.detach().float() - layers_o[name].module.weight.detach().float()


def extract_module(name: str, diff: torch.Tensor, rank: int, clamp_quantile: float | None = None,
                   device: str | None = None) -> tuple[LoraWeights, ModuleExtract]:
    """The rank-``rank`` LoRA module closest to ``diff`` (alpha = rank), and its error."""
    matrix = diff.to(device or "cpu").reshape(diff.shape[0], -1)
    rank = min(rank, *matrix.shape)
    up, down = top_factors(matrix, rank).truncate(rank)
    if clamp_quantile is not None and clamp_quantile < 1:
        limit = _quantile(torch.cat([up.flatten(), down.flatten()]).abs(), clamp_quantile)
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    norm = float(matrix.norm())
    error = float((matrix - up @ down).norm()) / norm if norm > 0 else 0.0
    conv = diff.dim() == 4
    module = LoraWeights(
        name,
        down.reshape(rank, *diff.shape[1:]).cpu().contiguous(),
        (up.reshape(diff.shape[0], rank, 1, 1) if conv else up).cpu().contiguous(),
        float(rank),
    )
    kind = "linear" if not conv else ("conv1x1" if tuple(diff.shape[2:]) == (1, 1) else "conv3x3")
    return module, ModuleExtract(name, kind, rank, error, norm)


def _quantile(values: torch.Tensor, q: float) -> float:
    """``torch.quantile`` without its 16M-element limit (lower value, no interpolation)."""
    k = max(1, min(values.numel(), int(round(q * (values.numel() - 1))) + 1))
    return float(values.flatten().kthvalue(k).values)


def _overall(infos: list[ModuleExtract]) -> float:
    total = sum(m.norm**2 for m in infos)
    return (sum((m.relative_error * m.norm) ** 2 for m in infos) / total) ** 0.5 if total > 0 else 0.0


def extract_metadata(components, out: Path, base, tuned, rank: int, conv_rank: int | None) -> dict[str, str]:
    """sd-scripts' minimum LoRA metadata plus ModelSpec keys."""
    from trainer.network.metadata import MODELSPEC_VERSION, NETWORK_MODULE
    from trainer.tools.base_modules import family_adapter

    version = family_adapter(components.family, components.unet, components.text_encoders,
                             components.v_parameterization).version_metadata()
    args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if conv_rank else {}
    return {
        "ss_v2": str(version.v2),
        "ss_base_model_version": version.base_model_version,
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_network_args": json.dumps(args),
        "ss_output_name": out.stem,
        "ss_sd_model_name": Path(base).name,
        "ss_training_comment": f"extracted by Nekoya from {Path(tuned).name} minus {Path(base).name}",
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{version.architecture}/lora",
        "modelspec.implementation": version.implementation,
        "modelspec.title": out.stem,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": version.prediction_type,
    }
