"""A kohya LoRA file as modules: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

Every tool reads LoRAs through :func:`read_lora`, so they all agree on what a
module is, what its weight change is (sd-scripts' merge formula, §1.3 of the
reference) and which keys are not plain LoRA (LoHa, LoKr, DoRA, PEFT names...).
"""
from __future__ import annotations

import os
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
        return next((p for p in sorted(PREFIX_ROLES, key=len, reverse=True) if self.name.startswith(p + "_")), "")

    @property
    def role(self) -> str:
        return PREFIX_ROLES.get(self.prefix, "unknown")

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
    problems: list[str] = field(default_factory=list)  # keys that are not (complete) plain LoRA
    dtypes: tuple[str, ...] = ()
    file_bytes: int = 0

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
    modules, problems = parse_modules(tensors)
    if not modules:
        raise LoraFormatError(f"{path.name} is not a LoRA file: {_what_it_holds(tensors, problems)}")
    dtypes = tuple(sorted({str(t.dtype).replace("torch.", "") for t in tensors.values() if t.is_floating_point()}))
    return LoraFile(path, modules, metadata, problems, dtypes, os.path.getsize(path))


def _what_it_holds(tensors: dict, problems: list[str]) -> str:
    from trainer.checkpoints.ldm_keys import LDM_PREFIXES

    if any(key.startswith(LDM_PREFIXES["unet"]) for key in tensors):
        return "it is a Stable Diffusion model checkpoint (use it as the base model, not as a LoRA)"
    found = f"; it holds {problems[0]}" if problems else ""
    return f"it has no kohya LoRA modules (lora_down/lora_up pairs){found}"


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
    """Group kohya keys into modules; describe everything else as a problem.

    A module that also carries foreign parts (``lora_mid``, ``dora_scale``...) is left
    out: its weight change is not up @ down, so merging it as plain LoRA would be wrong.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    foreign: dict[str, int] = {}
    tainted: dict[str, str] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        if name.startswith("lora_") and part in PARTS:
            parts.setdefault(name, {})[PARTS[part]] = value
            continue
        label = next((what for marker, what in FOREIGN_KEYS if marker in key), "keys of an unknown format")
        foreign[label] = foreign.get(label, 0) + 1
        tainted[name] = label
    problems = [f"{count} {label} key(s), which these tools cannot use" for label, count in foreign.items()]
    modules = {}
    for name, found in sorted(parts.items()):
        problem = _module_problem(name, found, tainted.get(name))
        if problem:
            problems.append(problem)
            continue
        down, up = found["down"], found["up"]
        alpha = float(found["alpha"].float().item()) if "alpha" in found else 0.0
        modules[name] = LoraWeights(name, down, up, alpha or float(down.shape[0]))  # sd-scripts: 0/None -> rank
    return modules, problems


def _module_problem(name: str, found: dict[str, torch.Tensor], foreign_part: str | None) -> str | None:
    if foreign_part:
        return f"{name}: also has {foreign_part} weights, so it is not plain LoRA and is left out"
    if "down" not in found or "up" not in found:
        missing = "lora_up" if "down" in found else "lora_down"
        return f"{name}: no {missing}.weight, so the module is incomplete and left out"
    down, up = found["down"], found["up"]
    fits = up.dim() == down.dim() in (2, 4) and down.shape[0] == up.shape[1] and tuple(up.shape[2:]) in ((), (1, 1))
    if not fits:
        return f"{name}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do not fit together; left out"
    return None
