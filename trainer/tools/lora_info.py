"""Inspect a LoRA file and verify it against a base model.

:func:`inspect_lora` -> :class:`LoraReport` (modules, rank/alpha/norm per module,
base model version and training settings from the ``ss_*`` metadata).
:func:`verify_lora` -> :class:`MatchReport` (which keys match a module of the base
model, which do not, which have the wrong shape). Both have ``format()`` for people
and ``to_dict()`` for JSON.
"""
from __future__ import annotations

import datetime
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from trainer.families import family_spec, spec_for_lora, spec_for_lora_keys
from trainer.tools.lora_file import LoraFile, read_lora, role_of, shapes_fit

# ss_base_model_version -> what people call it
BASE_VERSIONS = {
    "sd_v1": "SD 1.x",
    "sd_v1_v": "SD 1.x (v-prediction)",
    "sd_v2": "SD 2.x (512, epsilon)",
    "sd_v2_v": "SD 2.x (768, v-prediction)",
    "sdxl_base_v1-0": "SDXL 1.0",
}
SGM_MARKERS = (
    "lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
)


def _date(value: str) -> str:
    return datetime.datetime.fromtimestamp(float(value)).isoformat(sep=" ", timespec="seconds")


def _network_args(value: str) -> str:
    args = json.loads(value)
    return " ".join(f"{k}={v}" for k, v in args.items()) if isinstance(args, dict) else value


# (metadata key, label, formatter) of the training facts shown, in this order
SETTING_ROWS = (
    ("ss_output_name", "output name", str),
    ("modelspec.title", "title", str),
    ("ss_sd_model_name", "trained on", str),
    ("ss_network_module", "network module", str),
    ("ss_network_dim", "network dim", str),
    ("ss_network_alpha", "network alpha", str),
    ("ss_network_args", "network args", _network_args),
    ("ss_learning_rate", "learning rate", str),
    ("ss_unet_lr", "UNet lr", str),
    ("ss_text_encoder_lr", "text encoder lr", str),
    ("ss_optimizer", "optimizer", str),
    ("ss_lr_scheduler", "lr scheduler", str),
    ("ss_num_train_images", "train images (with repeats)", str),
    ("ss_num_reg_images", "regularisation images", str),
    ("ss_batch_size_per_device", "batch size", str),
    ("ss_epoch", "epochs done", str),
    ("ss_num_epochs", "epochs planned", str),
    ("ss_steps", "steps done", str),
    ("ss_max_train_steps", "steps planned", str),
    ("ss_resolution", "resolution", str),
    ("ss_clip_skip", "clip skip", str),
    ("ss_mixed_precision", "mixed precision", str),
    ("ss_noise_offset", "noise offset", str),
    ("ss_min_snr_gamma", "min SNR gamma", str),
    ("ss_seed", "seed", str),
    ("ss_training_comment", "comment", str),
    ("ss_training_started_at", "started", _date),
    ("ss_training_finished_at", "finished", _date),
    ("sshs_model_hash", "model hash (sshs)", lambda v: v[:12]),
)


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    role: str  # "UNet", "text encoder", ...
    kind: str  # "linear", "conv1x1", "conv3x3"; a LyCORIS module: its type ("LoHa"...)
    rank: int  # 0 where the type has none (iA3, full)
    alpha: float
    norm: float  # ‖ΔW‖_F at multiplier 1; NaN for LyCORIS modules (most need the base weight)
    delta_shape: tuple[int, ...]  # () for LyCORIS modules
    type: str = "LoRA"  # "LoRA" (lora_down/lora_up) or the LyCORIS type


@dataclass
class LoraReport:
    path: str
    file_bytes: int
    dtypes: tuple[str, ...]
    modules: list[ModuleInfo]
    problems: list[str]
    metadata: dict[str, str]
    family_from_keys: str | None  # a family key (trainer.families); None: cannot tell
    settings: list[tuple[str, str]] = field(default_factory=list)  # (label, value) from the metadata
    top_tags: list[tuple[str, int]] = field(default_factory=list)
    file_type: str = "LoRA"  # "LoRA", or "LyCORIS LoHa"... (metadata's algo, else from the keys)
    types: dict[str, int] = field(default_factory=dict)  # modules per type ("LoRA", "LoHa"...)

    @property
    def base_version(self) -> str | None:
        version = self.metadata.get("ss_base_model_version")
        return BASE_VERSIONS.get(version, version) if version else None

    def ranks(self) -> Counter:
        return Counter((m.kind == "conv3x3", m.rank, m.alpha) for m in self.modules if m.type == "LoRA")

    def summary(self) -> str:
        roles = Counter(m.role for m in self.modules)
        parts = ", ".join(f"{count} {role}" for role, count in roles.items())
        family = (family_spec(self.family_from_keys).short_label if self.family_from_keys else "unknown family")
        kind = "" if self.file_type == "LoRA" else f"{self.file_type}, "
        return f"{kind}{len(self.modules)} modules ({parts}), {self._rank_text()}; {family} (from keys)"

    def _rank_text(self) -> str:
        groups = []
        for (conv, rank, alpha), count in sorted(self.ranks().items()):
            label = "conv rank" if conv else "rank"
            groups.append(f"{label} {rank} alpha {alpha:g} ×{count}")
        return "; ".join(groups + self._lycoris_rank_text())

    def _lycoris_rank_text(self) -> list[str]:
        """Per LyCORIS type: its rank and alpha where it has them (OFT: block size and constraint)."""
        groups = Counter((m.type, m.rank, m.alpha) for m in self.modules if m.type != "LoRA")
        return [f"{kind}{_rank_words(kind, rank, alpha)} ×{count}" for (kind, rank, alpha), count in
                sorted(groups.items())]

    def format(self, modules: bool = False) -> str:
        lines = [f"LoRA {self.path}", f"  {self.summary()}",
                 f"  file: {self.file_bytes / 2**20:.1f} MiB, {', '.join(self.dtypes)}"]
        if self.base_version:
            lines.append(f"  base model (metadata): {self.base_version}")
        known = [m for m in self.modules if not math.isnan(m.norm)]
        if known:
            norms = [m.norm for m in known]
            top = max(known, key=lambda m: m.norm)
            lines.append(f"  ‖ΔW‖: mean {sum(norms) / len(norms):.4g}, max {top.norm:.4g} ({top.name})")
        lines += [f"  problem: {p}" for p in self.problems]
        if self.settings:
            lines.append("Training settings (metadata):")
            width = max(len(label) for label, _ in self.settings)
            lines += [f"  {label:<{width}}  {value}" for label, value in self.settings]
        if self.top_tags:
            lines.append("Most frequent tags: " + ", ".join(f"{tag} ({n})" for tag, n in self.top_tags))
        if modules:
            lines.append("Modules (kind, rank, alpha, ‖ΔW‖):")
            lines += [f"  {m.name}  {m.kind} r{m.rank} a{m.alpha:g} {m.norm:.4g}" for m in self.modules]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["base_version"] = self.base_version
        for module in data["modules"]:  # JSON has no NaN
            module["norm"] = None if math.isnan(module["norm"]) else module["norm"]
        return data


def _rank_words(kind: str, rank: int, alpha: float) -> str:
    if not rank:  # iA3, full weights, full-matrix LoKr
        return ""
    if kind in ("Diag-OFT", "BOFT"):  # their network_dim is the block size, network_alpha the constraint
        return f" block size {rank} constraint {alpha:g}"
    return f" rank {rank} alpha {alpha:g}"


def inspect_lora(path, lora: LoraFile | None = None) -> LoraReport:
    """Read ``path`` (or use an already read ``lora``) and describe it."""
    lora = lora or read_lora(path)
    modules = [
        ModuleInfo(m.name, m.role, m.kind, m.rank, m.alpha, m.norm(), m.delta_shape())
        for m in lora.modules.values()
    ] + [_lycoris_info(m) for m in lora.lycoris.values()]
    return LoraReport(
        path=str(lora.path),
        file_bytes=lora.file_bytes,
        dtypes=lora.dtypes,
        modules=modules,
        problems=list(lora.problems),
        metadata=dict(lora.metadata),
        family_from_keys=family_from_keys(lora),
        settings=_settings_rows(lora.metadata),
        top_tags=_top_tags(lora.metadata.get("ss_tag_frequency")),
        file_type=lora.type_label(),
        types=dict(lora.types()),
    )


def _lycoris_info(module) -> ModuleInfo:
    alpha = module.alpha if module.alpha is not None else 0.0
    return ModuleInfo(module.name, role_of(module.name), module.type, module.rank or 0, alpha, math.nan, (),
                      module.type)


def family_from_keys(lora: LoraFile) -> str | None:
    """SGM-named (SDXL) from its key names, else from the text-encoder or cross-attention width
    (SD1: CLIP-L 768, SD2: OpenCLIP-H 1024)."""
    own = spec_for_lora_keys(lora.names())  # a family with key names of its own (FLUX.1's blocks)
    if own is not None:
        return own.key
    if any(name.startswith(SGM_MARKERS) for name in lora.names()):
        spec = spec_for_lora(sgm_names=True)
        return spec.key if spec else None
    widths = {n: int(m.down.shape[1]) for n, m in lora.modules.items()}
    widths.update({n: m.in_features for n, m in lora.lycoris.items() if m.in_features})
    for suffix in ("_self_attn_q_proj", "_attn2_to_k"):
        width = next((w for n, w in widths.items() if n.endswith(suffix)), None)
        if width is not None:
            spec = spec_for_lora(sgm_names=False, conditioning_width=width)
            return spec.key if spec else None
    return None


def _settings_rows(metadata: dict[str, str]) -> list[tuple[str, str]]:
    rows = []
    for key, label, show in SETTING_ROWS:
        value = metadata.get(key)
        if value in (None, "", "None"):
            continue
        try:
            rows.append((label, show(value)))
        except (ValueError, TypeError):  # a hand-edited value: show it as it is
            rows.append((label, value))
    return rows


def _top_tags(value: str | None, count: int = 10) -> list[tuple[str, int]]:
    if not value:
        return []
    try:
        folders = json.loads(value)
    except ValueError:
        return []
    totals: Counter = Counter()
    for tags in folders.values() if isinstance(folders, dict) else ():
        totals.update({tag: int(n) for tag, n in tags.items()} if isinstance(tags, dict) else {})
    return totals.most_common(count)


# ---- verify against a base model -----------------------------------------------------------------

@dataclass
class MatchReport:
    lora_path: str
    base_path: str
    base_family: str
    matched: int
    matched_by_alias: int  # matched through diffusers-style UNet names (SDXL)
    unmatched: list[str]
    shape_mismatches: list[tuple[str, tuple, tuple]]  # (name, ΔW shape, layer weight shape)
    base_layers: dict[str, int]  # kohya prefix -> LoRA-able layers of the base model
    lora_family: str | None = None
    misfits: list[str] = field(default_factory=list)  # LyCORIS modules whose tensors do not fit their layer (why)

    @property
    def ok(self) -> bool:
        return not self.unmatched and not self.shape_mismatches and not self.misfits

    def summary(self) -> str:
        total = self.matched + len(self.unmatched) + len(self.shape_mismatches) + len(self.misfits)
        text = f"{self.matched} of {total} modules match {family_spec(self.base_family).short_label} model {self.base_path}"
        if self.unmatched:
            text += f"; {len(self.unmatched)} unmatched"
        if self.shape_mismatches or self.misfits:
            text += f"; {len(self.shape_mismatches) + len(self.misfits)} with the wrong shape"
        return text

    def format(self, limit: int = 20) -> str:
        lines = [("OK: " if self.ok else "MISMATCH: ") + self.summary()]
        if self.matched_by_alias:
            lines.append(f"  {self.matched_by_alias} modules use diffusers-style UNet names: sd-scripts, ComfyUI and "
                         "diffusers accept them, A1111 may not")
        if self.lora_family and self.lora_family != self.base_family and not self.ok:
            lines.append(f"  the keys look like an {family_spec(self.lora_family).short_label} LoRA: "
                         "choose a base model of that family")
        lines += _listed("unmatched", self.unmatched, limit)
        mismatches = [f"{n}: ΔW {list(a)} vs layer {list(b)}" for n, a, b in self.shape_mismatches]
        lines += _listed("wrong shape", mismatches + self.misfits, limit)
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def _listed(label: str, items: list[str], limit: int) -> list[str]:
    lines = [f"  {label}: {item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more {label}")
    return lines


def verify_lora(lora, base, modules=None) -> MatchReport:
    """Check every module of ``lora`` (path or LoraFile) against the base model at ``base``.

    ``modules`` (a :class:`~trainer.tools.base_modules.BaseModules`) skips building the
    base model's layer index again; by default weightless (meta-device) models are used.
    """
    from trainer.tools.base_modules import empty_models
    from trainer.tools.layer_index import as_model_layers, model_layers

    lora = lora if isinstance(lora, LoraFile) else read_lora(lora)
    modules = model_layers(*empty_models(base)) if modules is None else as_model_layers(modules)
    matched = by_alias = 0
    unmatched, mismatches, misfits = [], [], []
    for name in lora.names():
        layer = modules.find(name)
        if layer is None:
            unmatched.append(name)
            continue
        weight_shape = tuple(layer.module.weight.shape)
        module = lora.modules.get(name)
        if module is not None and not shapes_fit(module.delta_shape(), weight_shape):
            mismatches.append((name, module.delta_shape(), weight_shape))
            continue
        misfit = None if module is not None else _lycoris_misfit(lora.lycoris[name], layer.module)
        if misfit:
            misfits.append(misfit)
            continue
        matched += 1
        by_alias += name in modules.aliases
    return MatchReport(str(lora.path), str(base), modules.family, matched, by_alias, unmatched, mismatches,
                       modules.count_by_prefix(), family_from_keys(lora), misfits)


def _lycoris_misfit(weights, layer) -> str | None:
    """Why a LyCORIS module cannot be rebuilt on ``layer`` (a weightless one will do), else None."""
    from trainer.tools.lycoris_file import LycorisModuleError, rebuild

    if "diff" in weights.parts:  # full weights: LyCORIS's loader copies the layer's weight, so compare shapes
        shape, diff = tuple(layer.weight.shape), tuple(weights.parts["diff"].shape)
        return None if shapes_fit(diff, shape) else f"{weights.name}: diff {list(diff)} vs layer {list(shape)}"
    try:
        rebuild(weights, layer)
    except LycorisModuleError as exc:
        return str(exc)
    return None
