"""A kohya LoRA file as modules: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

Every tool reads LoRAs through :func:`read_lora`, so they all agree on what a
module is, what its weight change is (sd-scripts' merge formula, §1.3 of the
reference) and which keys no tool can use (PEFT names, incomplete modules...).
Other kohya-named modules (LyCORIS: LoHa, LoKr, iA3, OFT, lora_mid, DoRA...) are
kept apart in ``LoraFile.lycoris`` (trainer.tools.lycoris_file).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.tools.errors import ToolError

# key suffix -> field of LoraWeights
PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}

# LoRA name prefix -> which model it patches (sd-scripts' prefixes)
PREFIX_ROLES = {
    "lora_unet": "UNet",
    "lora_te": "text encoder",
    "lora_te1": "text encoder 1",
    "lora_te2": "text encoder 2",
}

# key fragment -> what the key belongs to, for keys that are not plain LoRA
FOREIGN_KEYS = (
    ("hada_", "LyCORIS LoHa"),
    ("lokr_", "LyCORIS LoKr"),
    ("lora_mid", "LoCon CP decomposition (lora_mid)"),
    ("dora_scale", "DoRA magnitude"),
    ("lora_A", "PEFT/diffusers format"),
    ("lora_B", "PEFT/diffusers format"),
    ("lora.down", "diffusers attention-processor format"),
    ("lora.up", "diffusers attention-processor format"),
    ("bundle_emb", "bundled textual-inversion embedding"),
    (".diff", "full weight difference"),
)


class LoraFormatError(ToolError):
    """The file is not a usable kohya LoRA (message meant for the user)."""


@dataclass
class LoraWeights:
    """One module of a LoRA file, as stored (any dtype); ``alpha`` defaults to the rank."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def prefix(self) -> str:
        return prefix_of(self.name)

    @property
    def role(self) -> str:
        return role_of(self.name)

    @property
    def kind(self) -> str:
        """"linear", "conv1x1" or "conv3x3" (any kernel larger than 1x1)."""
        if self.down.dim() == 2:
            return "linear"
        return "conv1x1" if tuple(self.down.shape[2:]) == (1, 1) else "conv3x3"

    def delta_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def delta(self, multiplier: float = 1.0) -> torch.Tensor:
        """ΔW = multiplier · alpha/rank · up @ down, in float32, shaped like the base layer's weight."""
        return delta_weight(self.down, self.up, self.scale * multiplier)

    def norm(self) -> float:
        """‖ΔW‖_F at multiplier 1, from the r×r Gram matrices (no out×in product is formed)."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        squared = ((up.T @ up) * (down @ down.T)).sum().clamp(min=0)
        return float(squared.sqrt()) * abs(self.scale)


def prefix_of(name: str) -> str:
    """The kohya prefix of a module name ("lora_te1"...), "" when it has none."""
    return next((p for p in sorted(PREFIX_ROLES, key=len, reverse=True) if name.startswith(p + "_")), "")


def role_of(name: str) -> str:
    """Which model a module name patches ("UNet", "text encoder 1"...)."""
    return PREFIX_ROLES.get(prefix_of(name), "unknown")


def delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """sd-scripts' merge formula for Linear, 1x1 and kxk conv modules (up is always 1x1)."""
    product = up.float().flatten(1) @ down.float().flatten(1)
    return product.reshape(up.shape[0], *down.shape[1:]) * scale


def shapes_fit(delta_shape, weight_shape) -> bool:
    """Whether a ΔW of ``delta_shape`` applies to a weight of ``weight_shape``.

    A 1x1-conv LoRA fits a Linear layer and the reverse (SD2 ``proj_in``/``proj_out``
    are convs in sd-scripts' single-file models, Linear in diffusers).
    """
    return _squeezed(tuple(delta_shape)) == _squeezed(tuple(weight_shape))


def _squeezed(shape: tuple) -> tuple:
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def fit_to_layer(delta: torch.Tensor, weight_shape) -> torch.Tensor:
    """``delta`` reshaped to the layer's weight shape (see :func:`shapes_fit`)."""
    if not shapes_fit(delta.shape, weight_shape):
        raise ValueError(f"a weight change of shape {tuple(delta.shape)} does not fit a layer of shape "
                         f"{tuple(weight_shape)}")
    return delta.reshape(tuple(weight_shape))


@dataclass
class LoraFile:
    path: Path
    modules: dict[str, LoraWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # keys no tool can use (incomplete, unknown format)
    dtypes: tuple[str, ...] = ()
    file_bytes: int = 0
    lycoris: dict = field(default_factory=dict)  # name -> LycorisWeights (trainer.tools.lycoris_file)

    def names(self) -> list[str]:
        """Every usable module, plain LoRA and LyCORIS."""
        return sorted([*self.modules, *self.lycoris])

    def types(self) -> Counter:
        """Modules per type: "LoRA" for lora_down/lora_up modules, else the LyCORIS type ("LoHa"...)."""
        return Counter(["LoRA"] * len(self.modules) + [m.type for m in self.lycoris.values()])

    def type_label(self) -> str:
        """What the file is, e.g. "LyCORIS LoHa" (training metadata first, else from the keys)."""
        from trainer.tools.lycoris_file import declared_type

        declared = declared_type(self.metadata)
        if declared:
            return declared
        found = sorted(t for t in self.types() if t != "LoRA")
        return "LyCORIS " + "/".join(found) if found else "LoRA"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The kohya state dict of the modules (what a writer saves back)."""
        return module_tensors(self.modules.values())


def module_tensors(modules, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        cast = dtype or m.down.dtype
        out[f"{m.name}.lora_down.weight"] = m.down.to(cast).contiguous()
        out[f"{m.name}.lora_up.weight"] = m.up.to(cast).contiguous()
        out[f"{m.name}.alpha"] = torch.tensor(float(m.alpha), dtype=cast)
    return out


def read_lora(path) -> LoraFile:
    """Read a kohya LoRA (.safetensors, or a weights-only .ckpt/.pt). Raises LoraFormatError."""
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"LoRA file not found: {path}")
    tensors, metadata = _read_tensors(path)
    modules, lycoris, problems = parse_file(tensors)
    if not modules and not lycoris:
        raise LoraFormatError(f"{path.name} is not a LoRA file: {_what_it_holds(tensors, problems)}")
    dtypes = tuple(sorted({str(t.dtype).replace("torch.", "") for t in tensors.values() if t.is_floating_point()}))
    return LoraFile(path, modules, metadata, problems, dtypes, os.path.getsize(path), lycoris)


def _what_it_holds(tensors: dict, problems: list[str]) -> str:
    from trainer.checkpoints.ldm_keys import LDM_PREFIXES

    if any(key.startswith(LDM_PREFIXES["unet"]) for key in tensors):
        return "it is a Stable Diffusion model checkpoint (use it as the base model, not as a LoRA)"
    found = f"; it holds {problems[0]}" if problems else ""
    return f"it has no kohya LoRA modules (lora_down/lora_up pairs) nor LyCORIS modules{found}"


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from trainer.checkpoints.errors import CheckpointError
    from trainer.checkpoints.reader import PICKLE_SUFFIXES, load_pickle_state_dict

    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as exc:  # SafetensorError, OSError: a damaged or foreign file
            raise LoraFormatError(f"{path.name} is not a LoRA file: it cannot be read as .safetensors "
                                  "(truncated or damaged, or another kind of file renamed)") from exc
    if suffix not in PICKLE_SUFFIXES:
        raise LoraFormatError(f"{path.name} is not a LoRA file: LoRAs are .safetensors (or .ckpt/.pt) files")
    try:
        return load_pickle_state_dict(path), {}
    except CheckpointError as exc:
        raise LoraFormatError(f"{path.name} is not a LoRA file: {str(exc).removeprefix(path.name + ' ')}") from exc


def parse_modules(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, LoraWeights], list[str]]:
    """The plain LoRA modules and the problems (see :func:`parse_file`, which also keeps LyCORIS modules)."""
    modules, _, problems = parse_file(tensors)
    return modules, problems


def parse_file(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, LoraWeights], dict, list[str]]:
    """Group keys into modules: plain LoRA (exactly lora_down/lora_up/alpha), LyCORIS modules (any other kohya
    module: LoHa, LoKr, lora_mid, dora_scale...), and problems describing everything else."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        grouped.setdefault(name, {})[part] = value
    modules, lycoris, problems, foreign = {}, {}, [], Counter()
    for name, parts in sorted(grouped.items()):
        if name.startswith("lora_") and set(parts) <= set(PARTS):
            module = _classic_module(name, parts)
        elif name.startswith("lora_") and not _unknown_format(parts):
            from trainer.tools.lycoris_file import parse_lycoris

            module = parse_lycoris(name, parts)
        else:
            foreign.update(_label(f"{name}.{part}") for part in parts)
            continue
        if isinstance(module, str):
            problems.append(module)
        else:
            (modules if isinstance(module, LoraWeights) else lycoris)[name] = module
    foreign_problems = [f"{count} {label} key(s), which these tools cannot use" for label, count in foreign.items()]
    return modules, lycoris, foreign_problems + problems


def _unknown_format(parts: dict) -> bool:
    """Parts no LyCORIS type uses as its detector (PEFT lora_A, diffusers lora.down...)."""
    from trainer.tools.lycoris_file import known_parts

    return not set(parts) & known_parts()


def _label(key: str) -> str:
    return next((what for marker, what in FOREIGN_KEYS if marker in key), "keys of an unknown format")


def _classic_module(name: str, found: dict[str, torch.Tensor]) -> LoraWeights | str:
    parts = {PARTS[part]: value for part, value in found.items()}
    problem = _module_problem(name, parts)
    if problem:
        return problem
    down, up = parts["down"], parts["up"]
    if down.dim() == 4 and up.dim() == 2:  # LyCORIS DyLoRA saves a conv module's up flat: the same 1x1 conv
        up = up.reshape(*up.shape, 1, 1)
    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else 0.0
    return LoraWeights(name, down, up, alpha or float(down.shape[0]))  # sd-scripts: 0/None -> rank


def _module_problem(name: str, found: dict[str, torch.Tensor]) -> str | None:
    if "down" not in found or "up" not in found:
        missing = "lora_up" if "down" in found else "lora_down"
        return f"{name}: no {missing}.weight, so the module is incomplete and left out"
    down, up = found["down"], found["up"]
    fits = (up.dim() == down.dim() in (2, 4) or (up.dim(), down.dim()) == (2, 4)) \
        and down.shape[0] == up.shape[1] and tuple(up.shape[2:]) in ((), (1, 1))
    if not fits:
        return f"{name}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do not fit together; left out"
    return None
