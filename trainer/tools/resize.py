"""Resize a LoRA to a lower rank by SVD, keeping its effective scale (sd-scripts' resize_lora).

It handles LoRA/LoCon files (lora_down/lora_up, LyCORIS LoCon and DyLoRA included) and refuses the
other LyCORIS types by name.

For each module, ``up @ down`` is decomposed; the new up is U·S and the new down Vh,
truncated to the new rank, and ``new_alpha = old_alpha / old_rank × new_rank`` so that
ΔW = alpha/rank · up @ down is the best rank-k approximation of the old ΔW. The rank
is fixed (``rank``, ``conv_rank`` for 3x3 convs) or chosen per module by a dynamic
rule (``sv_ratio``, ``sv_cumulative``, ``sv_fro``) capped at it. It never exceeds a
module's old rank, so resizing to the old rank is lossless.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainer.tools.errors import ToolError, check_output_path
from trainer.tools.lora_file import PARTS, LoraWeights, module_tensors, read_lora
from trainer.tools.lowrank import DYNAMIC_METHODS, choose_rank, factor_product

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")
SAVE_PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModuleResize:
    name: str
    kind: str
    old_rank: int
    new_rank: int
    old_alpha: float
    new_alpha: float
    fro_retained: float  # fraction of ‖ΔW‖_F kept
    sum_retained: float  # fraction of the sum of singular values kept
    relative_error: float  # ‖ΔW_new − ΔW_old‖_F / ‖ΔW_old‖_F
    norm: float  # ‖ΔW_old‖_F


@dataclass
class ResizeResult:
    source: str
    out_path: str
    rank: int
    conv_rank: int
    dynamic_method: str | None
    dynamic_param: float | None
    modules: list[ModuleResize]
    overall_error: float  # ‖ΔW_new − ΔW_old‖_F / ‖ΔW_old‖_F over all modules together
    dtype: str
    seconds: float
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        ranks = Counter(m.new_rank for m in self.modules)
        old = Counter(m.old_rank for m in self.modules)
        how = f"{self.dynamic_method} {self.dynamic_param:g} (max rank {self.rank})" if self.dynamic_method else \
            f"rank {self.rank}" + (f", conv rank {self.conv_rank}" if self.conv_rank != self.rank else "")
        mean_fro = sum(m.fro_retained for m in self.modules) / max(len(self.modules), 1)
        return (f"resized {len(self.modules)} modules by {how}: ranks {_counts(old)} -> {_counts(ranks)}; "
                f"overall relative error {self.overall_error:.3%}, mean Frobenius retained {mean_fro:.2%}")

    def format(self, modules: bool = False) -> str:
        lines = [f"Resized {self.source}", f"  -> {self.out_path} ({self.dtype}, {self.seconds:.1f} s)",
                 f"  {self.summary()}"]
        worst = sorted(self.modules, key=lambda m: m.relative_error, reverse=True)[:3]
        lines += [f"  largest error: {m.name} {m.relative_error:.3%}" for m in worst if m.relative_error > 0]
        if modules:
            lines += [f"  {m.name}  r{m.old_rank}->{m.new_rank} alpha {m.old_alpha:g}->{m.new_alpha:g} "
                      f"fro kept {m.fro_retained:.2%} error {m.relative_error:.3%}" for m in self.modules]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return asdict(self)


def _counts(counter: Counter) -> str:
    return ", ".join(f"{rank}" + (f"×{n}" if len(counter) > 1 else "") for rank, n in sorted(counter.items()))


def resize_lora(path, out_path, rank: int, *, conv_rank: int | None = None, dynamic_method: str | None = None,
                dynamic_param: float | None = None, save_precision: str | None = None, device: str | None = None,
                overwrite: bool = False) -> ResizeResult:
    """Write the resized LoRA to ``out_path`` and say how much was lost.

    ``save_precision``: "float"/"fp16"/"bf16"; None keeps the input file's precision.
    """
    started = time.perf_counter()
    _check_arguments(rank, conv_rank, dynamic_method, dynamic_param, save_precision)
    lora = read_lora(path)
    _refuse_lycoris(lora)
    out = check_output_path(out_path, LORA_SUFFIXES, inputs=[path], overwrite=overwrite)
    conv_rank = conv_rank or rank
    dtype = SAVE_PRECISIONS[save_precision] if save_precision else lora.modules[next(iter(lora.modules))].down.dtype
    new_modules, infos = [], []
    with torch.no_grad():
        for module in lora.modules.values():
            max_rank = conv_rank if module.kind == "conv3x3" else rank
            resized, info = resize_module(module, max_rank, dynamic_method, dynamic_param, device)
            new_modules.append(resized)
            infos.append(info)
    tensors = module_tensors(new_modules, dtype)
    metadata = resized_metadata(lora.metadata, infos, rank, conv_rank, dynamic_method, dynamic_param)
    from trainer.saving import save_lora_file

    save_lora_file(str(out), tensors, metadata)
    return ResizeResult(str(lora.path), str(out), rank, conv_rank, dynamic_method, dynamic_param, infos,
                        overall_error(infos), str(dtype).replace("torch.", ""), time.perf_counter() - started, metadata)


def _refuse_lycoris(lora) -> None:
    """SVD resizing needs up @ down factors: LyCORIS types (LoHa, LoKr, iA3, OFT...) have other ones."""
    if not lora.lycoris:
        return
    extra = sorted({part for m in lora.lycoris.values() if m.type == "LoCon" for part in m.parts} - set(PARTS))
    parts = f" whose modules also have {', '.join(extra)} parts" if extra else ""
    raise ToolError(f"{lora.path.name}: resize handles LoRA/LoCon files (lora_down/lora_up); this is a "
                    f"{lora.type_label()} file{parts}. Use it as it is, or merge it into a checkpoint")


def _check_arguments(rank, conv_rank, method, param, save_precision) -> None:
    if int(rank) < 1 or (conv_rank is not None and int(conv_rank) < 1):
        raise ToolError("the new rank must be at least 1")
    if method and method not in DYNAMIC_METHODS:
        raise ToolError(f"unknown dynamic method {method!r}; choose {', '.join(DYNAMIC_METHODS)}")
    if method and (param is None or param <= 0):
        raise ToolError(f"{method} needs a positive dynamic parameter (sv_ratio: e.g. 2-10, sv_fro/sv_cumulative: 0-1)")
    if method in ("sv_fro", "sv_cumulative") and param > 1:
        raise ToolError(f"{method} takes a fraction between 0 and 1, not {param}")
    if save_precision and save_precision not in SAVE_PRECISIONS:
        raise ToolError(f"unknown precision {save_precision!r}; choose {', '.join(SAVE_PRECISIONS)}")


def resize_module(module: LoraWeights, max_rank: int, method: str | None = None, param: float | None = None,
                  device: str | None = None) -> tuple[LoraWeights, ModuleResize]:
    """One module at its new rank (float32 tensors) and what the resize cost."""
    up = module.up.to(device or "cpu", torch.float32).flatten(1)
    down = module.down.to(device or "cpu", torch.float32).flatten(1)
    factors = factor_product(up, down)
    new_rank = choose_rank(factors.S, max_rank, method, param)
    new_up, new_down = factors.truncate(new_rank)
    new_alpha = module.scale * new_rank
    resized = LoraWeights(
        module.name,
        new_down.reshape(new_rank, *module.down.shape[1:]).cpu(),
        new_up.reshape(module.up.shape[0], new_rank, *module.up.shape[2:]).cpu(),
        new_alpha,
    )
    fro, total = factors.retained(new_rank)
    norm_sq = float(factors.S.pow(2).sum())
    error = (factors.dropped_squared(new_rank) / norm_sq) ** 0.5 if norm_sq > 0 else 0.0
    info = ModuleResize(module.name, module.kind, module.rank, new_rank, module.alpha, new_alpha, fro, total, error,
                        norm_sq**0.5 * abs(module.scale))
    return resized, info


def overall_error(infos: list[ModuleResize]) -> float:
    """Relative Frobenius error of all ΔW together (large modules weigh more)."""
    total = sum(m.norm**2 for m in infos)
    lost = sum((m.relative_error * m.norm) ** 2 for m in infos)
    return (lost / total) ** 0.5 if total > 0 else 0.0


def resized_metadata(metadata: dict[str, str], infos: list[ModuleResize], rank: int, conv_rank: int,
                     method: str | None, param: float | None) -> dict[str, str]:
    """sd-scripts' metadata update: dim/alpha, a comment prefix; sshs hashes are recomputed on save."""
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    old_dim = max((m.old_rank for m in infos), default=0)
    comment = meta.get("ss_training_comment", "")
    if comment in ("None",):
        comment = ""
    if method:
        meta["ss_training_comment"] = f"Dynamic resize with {method}: {param} from {old_dim}; {comment}"
        meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
        return meta
    conv_desc = "" if conv_rank == rank else f" (conv: {conv_rank})"
    meta["ss_training_comment"] = f"dimension is resized from {old_dim} to {rank}{conv_desc}; {comment}"
    linear = [m for m in infos if m.kind != "conv3x3"] or infos
    meta["ss_network_dim"] = str(max(m.new_rank for m in linear))
    meta["ss_network_alpha"] = str(Counter(m.new_alpha for m in linear).most_common(1)[0][0])
    convs = [m for m in infos if m.kind == "conv3x3"]
    if convs and "ss_network_args" in meta:
        meta["ss_network_args"] = _resized_network_args(meta["ss_network_args"], convs)
    return meta


def _resized_network_args(value: str, convs: list[ModuleResize]) -> str:
    try:
        args = json.loads(value)
    except ValueError:
        return value
    if not isinstance(args, dict):
        return value
    args["conv_dim"] = str(max(m.new_rank for m in convs))
    args["conv_alpha"] = str(Counter(m.new_alpha for m in convs).most_common(1)[0][0])
    return json.dumps(args)


def default_resized_name(path, rank: int, method: str | None = None, param: float | None = None) -> Path:
    """``<name>-r<rank>.safetensors`` (or ``-sv_fro0.9``) next to the input."""
    path = Path(path)
    tag = f"{method}{param:g}" if method else f"r{rank}"
    return path.with_name(f"{path.stem}-{tag}{path.suffix}")
