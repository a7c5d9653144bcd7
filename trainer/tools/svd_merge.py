"""Merge several LoRA files into one LoRA of a chosen rank by SVD (sd-scripts' networks/svd_merge_lora.py,
kohya_ss's "Merge LoRA (SVD)").

For each module the weight changes are added, ΔW = Σ ratioᵢ·alphaᵢ/rᵢ·upᵢ@downᵢ (a file without the
module adds nothing), and ΔW's top singular directions become the new module: up = U·S, down = Vh,
alpha = its rank (scale 1). The rank is ``rank`` (``conv_rank`` for 3x3 convs), at most the layer's
input channels and outputs, as in sd-scripts. Factor values beyond the ``clamp_quantile`` of their
magnitudes are clamped (sd-scripts: always, at 0.99 of the signed values; magnitudes here, as our extract
does, so the arbitrary sign of a singular pair cannot change the result).

Unlike sd-scripts, the full out×in ΔW is never formed: ΔW = [ratio·scale·upᵢ] @ [downᵢ] is a product of
two thin matrices whose exact SVD trainer.tools.lowrank.factor_product finds from two QRs and a small
SVD, so the merge is fast on a CPU. ΔW has rank at most the sum of the inputs' ranks, so a module is
never written at a higher rank than that: the file is smaller and the weight change is the same.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from trainer.tools.errors import ToolError, check_output_path
from trainer.tools.lora_file import LoraWeights
from trainer.tools.lowrank import factor_product
from trainer.tools.merge_loras import (Entry, LoraMergeResult, LogFn, check_precision, merged_metadata,
                                       modules_by_name, read_inputs, save_merged)
from trainer.tools.requests import SvdMergeRequest
from trainer.tools.resize import LORA_SUFFIXES, SAVE_PRECISIONS

DEFAULTS = SvdMergeRequest.model_construct()  # the declared defaults (the output has none)


@dataclass(frozen=True)
class ModuleSvd:
    name: str
    kind: str
    rank: int
    relative_error: float  # ‖ΔW_new − ΔW‖_F / ‖ΔW‖_F
    norm: float  # ‖ΔW‖_F of the sum


@dataclass
class SvdMergeResult(LoraMergeResult):
    rank: int = 0
    conv_rank: int = 0
    modules: list[ModuleSvd] = field(default_factory=list)
    overall_error: float = 0.0  # over all modules together (large ones weigh more)

    def format(self, modules: bool = False) -> str:
        lines = [super().format().rstrip("\n"),
                 f"  asked rank {self.rank}, conv rank {self.conv_rank}; overall relative error "
                 f"{self.overall_error:.3%}"]
        capped = sum(m.rank < (self.conv_rank if m.kind == "conv3x3" else self.rank) for m in self.modules)
        if capped:
            lines.append(f"  {capped} modules have a lower rank: their summed weight change has no more "
                         "directions (or the layer is that narrow)")
        worst = sorted(self.modules, key=lambda m: m.relative_error, reverse=True)[:3]
        lines += [f"  largest error: {m.name} {m.relative_error:.3%}" for m in worst if m.relative_error > 0]
        if modules:
            lines += [f"  {m.name}  {m.kind} r{m.rank} ‖ΔW‖ {m.norm:.4g} error {m.relative_error:.3%}"
                      for m in self.modules]
        return "\n".join(lines) + "\n"


def svd_merge_loras(loras: Sequence, out_path, rank: int = DEFAULTS.rank, *, conv_rank: int | None = None,
                    clamp_quantile: float | None = DEFAULTS.clamp, save_precision: str = DEFAULTS.save_precision,
                    device: str | None = None, overwrite: bool = False, log: LogFn | None = None) -> SvdMergeResult:
    """Write the rank-``rank`` LoRA closest to the ratio-weighted sum of ``loras`` ((path, ratio) pairs).

    ``conv_rank`` None: ``rank``; ``clamp_quantile`` None (or 1): no clamping.
    """
    started, log = time.perf_counter(), log or (lambda message: None)
    _check_arguments(rank, conv_rank, clamp_quantile, save_precision)
    conv_rank = conv_rank or rank
    inputs = read_inputs(loras, "SVD merge", log)
    out = check_output_path(out_path, LORA_SUFFIXES, inputs=[w.path for w, _ in inputs], overwrite=overwrite)
    grouped = modules_by_name(inputs, same_rank=False)
    log(f"decomposing {len(grouped)} modules")
    merged, infos = [], []
    with torch.no_grad():
        for name, entries in grouped.items():
            target = conv_rank if entries[0][2].kind == "conv3x3" else rank
            module, info = svd_merge_module(name, entries, target, clamp_quantile, device)
            merged.append(module)
            infos.append(info)
    convs = [m.rank for m in merged if m.kind == "conv3x3"]
    args = json.dumps({"conv_dim": str(max(convs)), "conv_alpha": str(max(convs))}) if convs else None
    metadata = merged_metadata(inputs, out, merged, alpha=_same(m.rank for m in merged if m.kind != "conv3x3"),
                               comment=f"SVD to rank {rank}, conv rank {conv_rank}", network_args=args)
    saved = save_merged(out, inputs, merged, SAVE_PRECISIONS[save_precision], metadata, "svd", grouped, started)
    return SvdMergeResult(**vars(saved), rank=rank, conv_rank=conv_rank, modules=infos, overall_error=_overall(infos))


def _check_arguments(rank, conv_rank, clamp_quantile, save_precision) -> None:
    if int(rank) < 1 or (conv_rank is not None and int(conv_rank) < 1):
        raise ToolError("the new rank must be at least 1")
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise ToolError(f"clamp quantile must be in (0, 1], not {clamp_quantile}")
    check_precision(save_precision)


def svd_merge_module(name: str, entries: list[Entry], max_rank: int, clamp_quantile: float | None = None,
                     device: str | None = None) -> tuple[LoraWeights, ModuleSvd]:
    """The module of rank ≤ ``max_rank`` closest to Σ ratio·ΔW of ``entries`` (float32), and its error."""
    first = entries[0][2]
    up = torch.cat([m.up.to(device or "cpu", torch.float32).flatten(1) * (want.ratio * m.scale)
                    for want, _, m in entries], 1)
    down = torch.cat([m.down.to(device or "cpu", torch.float32).flatten(1) for _, _, m in entries], 0)
    factors = factor_product(up, down)
    out_dim, in_channels = first.delta_shape()[:2]
    rank = max(1, min(max_rank, in_channels, out_dim, len(factors.S)))  # sd-scripts: ≤ in and out channels
    new_up, new_down = factors.truncate(rank)
    if clamp_quantile is not None and clamp_quantile < 1:
        limit = _quantile(torch.cat([new_up.flatten(), new_down.flatten()]).abs(), clamp_quantile)
        new_up, new_down = new_up.clamp(-limit, limit), new_down.clamp(-limit, limit)
    norm = _product_norm(up, down)
    error = _product_norm(torch.cat([up, -new_up], 1), torch.cat([down, new_down], 0)) / norm if norm > 0 else 0.0
    conv = first.down.dim() == 4
    module = LoraWeights(
        name,
        new_down.reshape(rank, *first.down.shape[1:]).cpu().contiguous(),
        (new_up.reshape(out_dim, rank, 1, 1) if conv else new_up).cpu().contiguous(),
        float(rank),
    )
    return module, ModuleSvd(name, first.kind, rank, error, norm)


def _product_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """‖up @ down‖_F from the two small Gram matrices, without the out×in product (float64: the error of a
    near-exact approximation is a difference of nearly equal sums)."""
    up, down = up.double(), down.double()
    squared = ((up.T @ up) * (down @ down.T)).sum().clamp(min=0)
    return float(squared.sqrt())


def _quantile(values: torch.Tensor, q: float) -> float:
    """``torch.quantile`` without its 16M-element limit (lower value, no interpolation)."""
    k = max(1, min(values.numel(), int(round(q * (values.numel() - 1))) + 1))
    return float(values.flatten().kthvalue(k).values)


def _same(values) -> str:
    found = set(values)
    return str(found.pop()) if len(found) == 1 else "Dynamic"


def _overall(infos: list[ModuleSvd]) -> float:
    total = sum(m.norm**2 for m in infos)
    return (sum((m.relative_error * m.norm) ** 2 for m in infos) / total) ** 0.5 if total > 0 else 0.0
