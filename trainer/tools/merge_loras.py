"""Merge several LoRA files into one LoRA (sd-scripts' networks/merge_lora.py without --sd_model,
kohya_ss's "Merge LoRA").

sd-scripts adds the factors, not the weight changes. For each module, file i's lora_down is multiplied
by sᵢ = ratioᵢ·√(alphaᵢ/alpha₀) and its lora_up by |sᵢ| (alpha₀: the alpha of the first file that has the
module; the sign goes on lora_down only), and the results are summed; the module keeps alpha₀ and its rank:

    ΔW = alpha₀/r · (Σ|sᵢ|·upᵢ) @ (Σ sᵢ·downᵢ)

so one file at ratio k changes by k·|k|, and different LoRAs also mix through the cross terms upᵢ·downⱼ.
Every file must have the same rank for a module. ``concat`` stacks the scaled factors along the rank
instead (rank = the sum of the ranks R): no cross terms, any ranks; as sd-scripts keeps alpha₀, each
LoRA's change comes out as ratioᵢ·|ratioᵢ|·rᵢ/R·ΔWᵢ.

SVD merge (trainer.tools.svd_merge) adds the weight changes themselves. Both take LoRA/LoCon files
(lora_down/lora_up) of one base model family, and refuse other LyCORIS types and mixed families by name.
"""
from __future__ import annotations

import datetime
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from trainer.tools.errors import ToolError, check_output_path
from trainer.tools.lora_file import LoraFile, LoraWeights, module_tensors, read_lora, shapes_fit
from trainer.tools.merge import LoraToMerge, as_loras
from trainer.tools.requests import MergeLorasRequest
from trainer.tools.resize import LORA_SUFFIXES, SAVE_PRECISIONS

DEFAULTS = MergeLorasRequest.model_construct()  # the declared defaults (the output has none)
LogFn = Callable[[str], None]
# one module as found in the inputs: (the file's ratio, the file, its module)
Entry = tuple[LoraToMerge, LoraFile, LoraWeights]


@dataclass
class LoraMergeResult:
    out_path: str
    loras: list[LoraToMerge]
    method: str  # "add" (sd-scripts' factor sum), "concat" or "svd"
    ranks: dict[int, int]  # rank -> modules written
    partial: int  # modules only some of the files have
    dtype: str
    seconds: float
    metadata: dict[str, str] = field(default_factory=dict)

    HOW = {"add": "factors added", "concat": "factors concatenated", "svd": "weight changes added, then SVD"}

    def summary(self) -> str:
        loras = ", ".join(f"{Path(lora.path).name} ×{lora.ratio:g}" for lora in self.loras)
        several = len(self.ranks) > 1
        ranks = ", ".join(f"{rank}" + (f"×{n}" if several else "") for rank, n in sorted(self.ranks.items()))
        return f"merged {loras} ({self.HOW[self.method]}): {sum(self.ranks.values())} modules, rank {ranks}"

    def format(self, modules: bool = False) -> str:
        lines = [f"Merged LoRA {self.out_path}", f"  {self.summary()}", f"  {self.dtype}, {self.seconds:.1f} s"]
        if self.partial:
            lines.append(f"  {self.partial} of the modules are in only some of the files "
                         "(the others add nothing there)")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return asdict(self)


def merge_loras(loras: Sequence, out_path, *, concat: bool = DEFAULTS.concat, precision: str = DEFAULTS.precision,
                save_precision: str | None = DEFAULTS.save_precision, overwrite: bool = False,
                log: LogFn | None = None) -> LoraMergeResult:
    """Write the merge of ``loras`` ((path, ratio) pairs) to ``out_path``, as sd-scripts' merge_lora.py does.

    ``precision``: what the factors are added in; ``save_precision`` None: the same.
    """
    started, log = time.perf_counter(), log or (lambda message: None)
    for name in (precision, save_precision):
        check_precision(name)
    inputs = read_inputs(loras, "Merge LoRA", log)
    out = check_output_path(out_path, LORA_SUFFIXES, inputs=[w.path for w, _ in inputs], overwrite=overwrite)
    dtype = SAVE_PRECISIONS[precision]
    grouped = modules_by_name(inputs, same_rank=not concat)
    log(f"{'concatenating' if concat else 'adding'} {len(grouped)} modules")
    with torch.no_grad():
        merged = [(_concatenated if concat else _added)(name, entries, dtype) for name, entries in grouped.items()]
    save_dtype = SAVE_PRECISIONS[save_precision or precision]
    alphas = {str(float(m.alpha)) for m in merged}
    metadata = merged_metadata(inputs, out, merged, alpha=alphas.pop() if len(alphas) == 1 else "Dynamic",
                               comment="concatenated" if concat else "factors added")
    return save_merged(out, inputs, merged, save_dtype, metadata, "concat" if concat else "add", grouped, started)


def check_precision(name: str | None) -> None:
    if name is not None and name not in SAVE_PRECISIONS:
        raise ToolError(f"unknown precision {name!r}; choose {', '.join(SAVE_PRECISIONS)}")


def _scale(want: LoraToMerge, module: LoraWeights, alpha0: float, file: LoraFile) -> float:
    """sd-scripts' factor scale: ratio·√(alpha/alpha₀), so the product carries alpha/alpha₀ under alpha₀."""
    if module.alpha / alpha0 < 0:
        raise ToolError(f"{file.path.name}: {module.name} has alpha {module.alpha:g} of the other sign than "
                        f"{alpha0:g} in the first file; the factors of such modules cannot be added")
    return want.ratio * math.sqrt(module.alpha / alpha0)


def _added(name: str, entries: list[Entry], dtype: torch.dtype) -> LoraWeights:
    first = entries[0][2]
    down = up = None
    for want, file, module in entries:
        s = _scale(want, module, first.alpha, file)
        d = module.down.to(dtype).reshape(first.down.shape) * s
        u = module.up.to(dtype).reshape(first.up.shape) * abs(s)  # the sign once, on lora_down
        down, up = (d, u) if down is None else (down + d, up + u)
    return LoraWeights(name, down, up, first.alpha)


def _concatenated(name: str, entries: list[Entry], dtype: torch.dtype) -> LoraWeights:
    first = entries[0][2]
    downs, ups = [], []
    for want, file, module in entries:
        s = _scale(want, module, first.alpha, file)
        downs.append(module.down.to(dtype).reshape(module.rank, *first.down.shape[1:]) * s)
        ups.append(module.up.to(dtype).reshape(first.up.shape[0], module.rank, *first.up.shape[2:]) * abs(s))
    return LoraWeights(name, torch.cat(downs, 0), torch.cat(ups, 1), first.alpha)


# ---- shared with svd_merge ---------------------------------------------------------------------------------

def read_inputs(loras: Sequence, tool: str, log: LogFn) -> list[tuple[LoraToMerge, LoraFile]]:
    """The (ratio, file) pairs, each a LoRA/LoCon file, all for one model family."""
    inputs = []
    for want in as_loras(loras):
        log(f"loading {want.path}")
        file = read_lora(want.path)
        _refuse_lycoris(file, tool)
        inputs.append((want, file))
    _check_one_family([file for _, file in inputs])
    return inputs


def _refuse_lycoris(file: LoraFile, tool: str) -> None:
    """Only lora_down/lora_up modules can be added factor by factor (or summed into a low-rank ΔW)."""
    if file.lycoris:
        example = next(iter(file.lycoris.values()))
        raise ToolError(f"{file.path.name} is a {file.type_label()} file (e.g. {example.name} is {example.type}): "
                        f"{tool} takes LoRA/LoCon files (lora_down/lora_up) only. Leave it out, or merge it into "
                        "a checkpoint with the others (Merge into checkpoint takes every type)")


def _check_one_family(files: list[LoraFile]) -> None:
    from trainer.families import family_spec
    from trainer.tools.lora_info import family_from_keys

    known = [(file, family) for file in files if (family := family_from_keys(file))]
    for file, family in known[1:]:
        first, first_family = known[0]
        if family != first_family:
            raise ToolError(f"{file.path.name} is a LoRA for {family_spec(family).short_label} but "
                            f"{first.path.name} is for {family_spec(first_family).short_label}: merge LoRAs "
                            "trained for the same base model")


def modules_by_name(inputs, same_rank: bool) -> dict[str, list[Entry]]:
    """Each module's entries in file order; refuses modules whose shapes differ between files."""
    grouped: dict[str, list[Entry]] = {}
    for want, file in inputs:
        for name, module in file.modules.items():
            grouped.setdefault(name, []).append((want, file, module))
    for name, entries in grouped.items():
        _check_shapes(name, entries, same_rank)
    return dict(sorted(grouped.items()))


def _check_shapes(name: str, entries: list[Entry], same_rank: bool) -> None:
    _, first_file, first = entries[0]
    for _, file, module in entries[1:]:
        if not shapes_fit(module.delta_shape(), first.delta_shape()):
            raise ToolError(f"{name} changes a {list(module.delta_shape())} weight in {file.path.name} but a "
                            f"{list(first.delta_shape())} one in {first_file.path.name}: these LoRAs are for "
                            "different base models")
        if same_rank and module.rank != first.rank:
            raise ToolError(f"{file.path.name} has rank {module.rank} for {name} but {first_file.path.name} has "
                            f"rank {first.rank}: adding factors needs one rank. Concatenate them (--concat), use "
                            "SVD merge, or resize them to one rank first")


def merged_metadata(inputs, out: Path, modules: list[LoraWeights], alpha: str, comment: str,
                    network_args: str | None = None) -> dict[str, str]:
    """sd-scripts' minimum LoRA metadata (version keys from the first file that has them) and ModelSpec keys;
    the sshs hashes are added on save."""
    from trainer.network.metadata import MODELSPEC_VERSION, NETWORK_MODULE

    def first(key: str) -> str | None:
        return next((file.metadata[key] for _, file in inputs if file.metadata.get(key)), None)

    ranks = {m.rank for m in modules if m.kind != "conv3x3"} or {m.rank for m in modules}
    meta = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": alpha,
        "ss_output_name": out.stem,
        "ss_training_comment": f"merged by Nekoya ({comment}): " + _merged_from(inputs, ratios=True),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.title": out.stem,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.merged_from": _merged_from(inputs),
    }
    for key in ("ss_v2", "ss_base_model_version", "modelspec.architecture", "modelspec.implementation",
                "modelspec.prediction_type", "modelspec.resolution"):
        if first(key):
            meta[key] = first(key)
    if network_args:
        meta["ss_network_args"] = network_args
    return meta


def _merged_from(inputs, ratios: bool = False) -> str:
    """sd-scripts' merged_from: each input's ModelSpec title, else its file name without the suffix."""
    titles = [file.metadata.get("modelspec.title") or file.path.stem for _, file in inputs]
    if ratios:
        titles = [f"{title} x{want.ratio:g}" for title, (want, _) in zip(titles, inputs)]
    return ", ".join(titles)


def save_merged(out: Path, inputs, modules: list[LoraWeights], dtype: torch.dtype, metadata: dict[str, str],
                method: str, grouped: dict, started: float) -> LoraMergeResult:
    """Write the file atomically (sshs hashes of what is written) and describe it."""
    from trainer.saving import save_lora_file

    save_lora_file(str(out), module_tensors(modules, dtype), metadata)
    partial = sum(len(entries) < len(inputs) for entries in grouped.values())
    return LoraMergeResult(str(out), [want for want, _ in inputs], method, dict(Counter(m.rank for m in modules)),
                           partial, str(dtype).replace("torch.", ""), time.perf_counter() - started, metadata)
