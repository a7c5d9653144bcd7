"""LyCORIS modules of a LoRA file (LoHa, LoKr, iA3, OFT, GLoRA, full...), rebuilt through lycoris-lora.

A module whose keys are exactly ``lora_down``/``lora_up``/``alpha`` stays classic LoRA (trainer.tools.lora_file);
any other kohya-named module is handed to LyCORIS's own loader (``get_module``/``make_module``), so its weight
change is the one LyCORIS trains and applies. Imports of lycoris happen on first use.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass

import torch

from trainer.tools.errors import ToolError

# LyCORIS module class -> the type's name, as kohya_ss's "LyCORIS/<name>" dropdown says it
TYPE_NAMES = {
    "LoConModule": "LoCon", "LohaModule": "LoHa", "LokrModule": "LoKr", "IA3Module": "iA3",
    "DiagOFTModule": "Diag-OFT", "ButterflyOFTModule": "BOFT", "GLoRAModule": "GLoRA",
    "FullModule": "Native Fine-Tuning", "NormModule": "Norm", "DyLoraModule": "DyLoRA", "TLoraModule": "T-LoRA",
}
# ss_network_args' algo -> the type's name
ALGO_NAMES = {
    "lora": "LoCon", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "ia3": "iA3", "diag-oft": "Diag-OFT",
    "boft": "BOFT", "glora": "GLoRA", "dylora": "DyLoRA", "full": "Native Fine-Tuning",
}
# sd-scripts' own modules with LyCORIS's key layout (kohya_ss's Kohya types) -> what the file is
KOHYA_MODULES = {"networks.loha": "Kohya LoHa", "networks.lokr": "Kohya LoKr", "networks.dylora": "Kohya DyLoRA",
                 "networks.lora_fa": "LoRA-FA"}
# the parts a module cannot be rebuilt without; "a|b" means either part
REQUIRED = {
    "LoCon": ("lora_down.weight", "lora_up.weight"),
    "LoHa": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "LoKr": ("lokr_w1|lokr_w1_a", "lokr_w2|lokr_w2_a"),
    "iA3": ("weight",),
    "Diag-OFT": ("oft_blocks",),
    "BOFT": ("oft_blocks",),
    "GLoRA": ("a1.weight", "a2.weight", "b1.weight", "b2.weight"),
    "Native Fine-Tuning": ("diff",),
    "Norm": ("w_norm",),
}
# parts that come in pairs: one without the other is incomplete
PAIRS = {"lokr_w1_a": "lokr_w1_b", "lokr_w2_a": "lokr_w2_b", "hada_t1": "hada_t2"}


class LycorisModuleError(ToolError):
    """A LyCORIS module cannot be rebuilt on its layer (message meant for the user)."""


@dataclass
class LycorisWeights:
    """One LyCORIS module of a file: its type and its tensors by part name (``hada_w1_a``...)."""

    name: str
    type: str  # "LoHa", "LoKr"... (TYPE_NAMES)
    module_class: type
    parts: dict[str, torch.Tensor]

    @property
    def rank(self) -> int | None:
        """The rank (OFT: the block size) where the type has one; None for iA3, full and full-matrix LoKr."""
        for part, axis in (("lora_down.weight", 0), ("hada_w1_b", 0), ("lokr_w1_b", 0), ("lokr_w2_b", 0),
                           ("a2.weight", 0), ("oft_blocks", -1)):
            if part in self.parts:
                return int(self.parts[part].shape[axis])
        return None

    @property
    def alpha(self) -> float | None:
        alpha = self.parts.get("alpha")
        return None if alpha is None else float(alpha.float().item())

    @property
    def in_features(self) -> int | None:
        """The layer's input width where the tensors tell it (a Linear layer's), else None."""
        parts = self.parts
        for part in ("lora_down.weight", "hada_w1_b", "diff"):
            if part in parts:
                return int(parts[part].shape[1])
        w1, w2 = parts.get("lokr_w1", parts.get("lokr_w1_b")), parts.get("lokr_w2", parts.get("lokr_w2_b"))
        if w1 is not None and w2 is not None and w2.dim() == 2:
            return int(w1.shape[1] * w2.shape[1])
        if "on_input" in parts and bool(parts["on_input"].item()):
            return int(parts["weight"].shape[0])
        return None

    def params(self) -> tuple:
        """The arguments LyCORIS's ``make_module`` takes, in its order (its ``extract_state_dict``)."""
        return tuple(self.parts.get(part) for part in self.module_class.weight_list)


def parse_lycoris(name: str, parts: dict[str, torch.Tensor]) -> LycorisWeights | str:
    """The module, or why it cannot be used (a sentence naming the module)."""
    from lycoris.modules import get_module

    module_class, _ = get_module({f"{name}.{part}": value for part, value in parts.items()}, name)
    if module_class is None:
        return f"{name}: keys of an unknown format ({', '.join(sorted(parts))}); left out"
    type_name = TYPE_NAMES.get(module_class.__name__, module_class.__name__)
    unknown = sorted(set(parts) - set(module_class.weight_list))
    if unknown:
        return f"{name}: LyCORIS {type_name} module with parts LyCORIS does not know ({', '.join(unknown)}); left out"
    missing = _missing_parts(type_name, parts)
    if missing:
        return f"{name}: LyCORIS {type_name} module without {', '.join(missing)}, so it is incomplete and left out"
    misfit = _misfit(type_name, parts)
    if misfit:
        return f"{name}: its LyCORIS {type_name} tensors do not fit together ({misfit}); left out"
    return LycorisWeights(name, type_name, module_class, dict(parts))


def _missing_parts(type_name: str, parts) -> list[str]:
    missing = [need.replace("|", " or ") for need in REQUIRED.get(type_name, ())
               if not any(option in parts for option in need.split("|"))]
    return missing + [pair for part, pair in PAIRS.items() if part in parts and pair not in parts]


def _misfit(type_name: str, parts: dict[str, torch.Tensor]) -> str | None:
    """Why the factors of a low-rank type cannot multiply together (checked without the layer), else None."""
    pairs = {"LoCon": (("lora_up.weight", "lora_down.weight"),),
             "LoHa": (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")),
             "LoKr": (("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b"))}.get(type_name, ())
    for left, right in pairs:
        if left in parts and right in parts and parts[left].shape[1] != parts[right].shape[0]:
            return f"{left} {tuple(parts[left].shape)} and {right} {tuple(parts[right].shape)}"
    mid, down = parts.get("lora_mid.weight"), parts.get("lora_down.weight")
    if mid is not None and (down.dim() != 4 or tuple(down.shape[2:]) != (1, 1)):
        return f"lora_mid (CP decomposition) needs a 1x1 lora_down, not {tuple(down.shape)}"
    return None


def rebuild(weights: LycorisWeights, layer: torch.nn.Module) -> torch.nn.Module:
    """The LyCORIS module on ``layer`` (not applied), in eval mode and without gradients."""
    from lycoris.modules import IA3Module, make_module

    try:
        with _quiet(), torch.no_grad():
            if weights.module_class is IA3Module:  # LyCORIS 4's iA3 loader takes no on_input: built here
                module = _ia3(weights, layer)
            elif weights.type == "LoKr":
                module = _lokr(weights, layer)
            else:
                module = make_module(weights.module_class, weights.params(), weights.name, layer)
    except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as exc:
        shape = list(getattr(layer, "weight", torch.empty(0)).shape)
        raise LycorisModuleError(f"{weights.name}: its LyCORIS {weights.type} tensors do not fit the layer "
                                 f"(weight {shape}): {exc}") from exc
    if module is None:
        raise LycorisModuleError(f"{weights.name}: LyCORIS cannot rebuild a {weights.type} module from a file")
    return module.eval().requires_grad_(False)


def _ia3(weights: LycorisWeights, layer):
    from lycoris.modules import IA3Module

    on_input = weights.parts.get("on_input")
    module = IA3Module(weights.name, layer, 1, train_on_input=bool(on_input is not None and on_input.item()))
    module.weight.copy_(weights.parts["weight"])
    return module


def _lokr(weights: LycorisWeights, layer):
    """LyCORIS's loader, or, where it misreads a conv layer's input width from a decomposed ``lokr_w2``
    (LyCORIS 4.1.3), a module built for the layer that takes the file's factors as they are."""
    from lycoris.modules import LokrModule, make_module

    try:
        return make_module(LokrModule, weights.params(), weights.name, layer)
    except RuntimeError:
        pass
    parts = weights.parts
    rank, alpha = weights.rank or 1, weights.alpha or float(weights.rank or 1)
    module = LokrModule(weights.name, layer, 1, rank, alpha, use_tucker="lokr_t2" in parts,
                        decompose_both="lokr_w1_a" in parts, weight_decompose="dora_scale" in parts,
                        full_matrix=weights.rank is None)
    for part in LOKR_FACTORS:
        if part in parts:
            setattr(module, part, torch.nn.Parameter(parts[part].clone()))
    module.use_w1, module.use_w2, module.tucker = "lokr_w1" in parts, "lokr_w2" in parts, "lokr_t2" in parts
    module.scale = 1.0 if module.use_w1 and module.use_w2 else alpha / rank  # LyCORIS's rule
    if "dora_scale" in parts:
        module.dora_scale.copy_(parts["dora_scale"])
    return module


LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def weight_delta(module, multiplier: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ΔW, Δbias or None) the module's forward adds to its layer at ``multiplier``, shaped like the layer's weight.

    LoHa and LoKr: LyCORIS 4.1.3's ``get_diff_weight`` applies alpha/rank twice (its ``get_weight`` already
    holds it); its forward, A1111 and ComfyUI apply it once, so the change is taken as the forward takes it.
    """
    from lycoris.modules import LoConModule, LohaModule, LokrModule

    with torch.no_grad():
        if isinstance(module, (LohaModule, LokrModule)):
            diff = module.get_weight(module.shape) * module.scalar
            return _scaled(module, diff, multiplier), None
        if isinstance(module, LoConModule):
            return _scaled(module, module.get_diff_weight(1.0)[0], multiplier), None
        diff, bias = module.get_diff_weight(multiplier)
        return diff.reshape(module.shape), bias


def _scaled(module, diff: torch.Tensor, multiplier: float) -> torch.Tensor:
    """``diff`` at ``multiplier``; with DoRA (weight decomposition) the re-normalised weight minus the base."""
    diff = diff.reshape(module.shape)
    if not getattr(module, "wd", False):
        return diff * multiplier
    base = module._current_weight()
    return module.apply_weight_decompose(base + diff.to(base.dtype), multiplier) - base


def declared_type(metadata: dict[str, str]) -> str | None:
    """What the file's training metadata says it is ("LyCORIS LoHa" from ``ss_network_args`` algo, "Kohya LoKr"),
    else None (plain networks.lora, or no metadata)."""
    module = metadata.get("ss_network_module")
    if module in KOHYA_MODULES:
        return KOHYA_MODULES[module]
    if module != "lycoris.kohya":
        return None
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:
        return "LyCORIS"
    algo = str(args.get("algo", "lora")).lower() if isinstance(args, dict) else "lora"
    return f"LyCORIS {ALGO_NAMES.get(algo, algo)}"


def lora_file_type(path) -> str | None:
    """"LoRA" or "LyCORIS LoHa"... for a .safetensors file of kohya-named modules, from its header alone;
    None for anything else (a model, an unreadable file)."""
    from pathlib import Path

    from trainer.checkpoints.integrity import read_safetensors_header

    if Path(path).suffix.lower() != ".safetensors" or not Path(path).is_file():
        return None
    try:
        header = read_safetensors_header(Path(path))
    except (ValueError, OSError):
        return None
    names = {key.partition(".")[0] for key in header.tensors}
    if not names or not all(name.startswith("lora_") for name in names):
        return None
    declared = declared_type(dict(header.metadata))
    if declared:
        return declared
    types = {_type_of_keys(header.tensors, name) for name in names}
    found = sorted(t for t in types if t != "LoRA")
    return "LyCORIS " + "/".join(found) if found else "LoRA"


def _type_of_keys(keys, name: str) -> str:
    parts = {key.partition(".")[2] for key in keys if key.partition(".")[0] == name}
    if parts <= {"lora_down.weight", "lora_up.weight", "alpha"}:
        return "LoRA"
    from lycoris.modules import get_module

    module_class, _ = get_module({f"{name}.{part}": None for part in parts}, name)
    return TYPE_NAMES.get(module_class.__name__, module_class.__name__) if module_class else "LoRA"


@contextlib.contextmanager
def _quiet():
    """LyCORIS logs a line per module it builds; the tools report what matters."""
    logger = logging.getLogger("LyCORIS")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def known_parts() -> set[str]:
    """Every part name a LyCORIS type stores (without importing lycoris)."""
    return set(_KNOWN_PARTS)


_KNOWN_PARTS = (
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b",
    "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
    "lokr_w2_b", "lokr_t1", "lokr_t2", "weight", "on_input", "oft_blocks", "rescale", "a1.weight", "a2.weight",
    "b1.weight", "b2.weight", "bm.weight", "diff", "diff_b", "w_norm", "b_norm",
)
