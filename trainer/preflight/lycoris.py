"""LyCORIS types: the package is installed, the preset is one LyCORIS knows or a readable .toml file, and the
settings LyCORIS does not read under kohya_ss's arguments are named instead of silently ignored."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from trainer.lora_types import LYCORIS_PRESETS, TYPES
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem

LYCORIS_PIN = "lycoris-lora==4.1.3"
# the LyCORIS modules (lycoris-lora 4.1) that implement max-norm regularisation
MAX_NORM_ALGOS = ("locon", "loha", "lokr", "boft", "diag-oft")
PRESET_KEYS = ("enable_conv", "unet_target_module", "unet_target_name", "text_encoder_target_module",
               "text_encoder_target_name", "module_algo_map", "name_algo_map", "use_fnmatch")


def _lycoris_type(ctx: CheckContext):
    lora_type = TYPES.get(ctx.settings.LoRA_type)
    return lora_type if lora_type is not None and lora_type.lycoris else None


@preflight_check("network.lycoris")
def check_lycoris(ctx: CheckContext):
    lora_type = _lycoris_type(ctx)
    if lora_type is None:
        return
    s = ctx.settings
    if importlib.util.find_spec("lycoris") is None:
        yield Problem("error", "LoRA_type", f"{s.LoRA_type} needs the lycoris-lora package, which is not installed",
                      fix=f"run ./setup.sh again (or: pip install {LYCORIS_PIN})")
    problem = preset_problem(s.LyCORIS_preset)
    if problem:
        yield Problem("error", "LyCORIS_preset", problem,
                      fix=f"choose one of {', '.join(LYCORIS_PRESETS)}, or the path of a LyCORIS preset .toml file")
    if s.network_dropout:
        yield Problem("warning", "network_dropout", f"network_dropout = {s.network_dropout:g} has no effect on "
                      f"{s.LoRA_type}: sd-scripts passes it to lycoris.kohya as neuron_dropout, which LyCORIS does "
                      "not read (the same happens in kohya_ss)", fix="set it to 0, or use Rank dropout / Module dropout")
    if s.scale_weight_norms and lora_type.algo not in MAX_NORM_ALGOS:
        yield Problem("warning", "scale_weight_norms", f"Scale weight norms has no effect on {s.LoRA_type}: its "
                      "LyCORIS module has no max-norm rule (the same happens in kohya_ss)", fix="set it to 0")
    if s.dim_from_weights and s.network_weights:
        yield Problem("warning", "dim_from_weights", f"DIM from weights applies to Standard and LoCon files; "
                      f"{s.LoRA_type} takes its ranks from the settings, and the weights file must match them")


def preset_problem(value: str) -> str | None:
    """Why a LyCORIS preset value cannot be used; None when it can."""
    if value in LYCORIS_PRESETS or value in ("unet-only", "ia3"):  # the last two: LyCORIS's own, not in the list
        return None
    path = Path(value).expanduser()
    if path.suffix.lower() != ".toml":
        return f"{value!r} is neither a LyCORIS preset name nor a .toml preset file"
    if not path.is_file():
        return f"the LyCORIS preset file {path} does not exist"
    try:
        preset = _read_toml(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"the LyCORIS preset file {path} is not valid TOML ({exc})"
    unknown = sorted(set(preset) - set(PRESET_KEYS))
    if unknown:
        return f"the LyCORIS preset file {path} has keys LyCORIS does not know: {', '.join(unknown)}"
    return None


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the toml package lycoris-lora itself reads presets with
        import toml

        return toml.load(path)
    with open(path, "rb") as f:
        return tomllib.load(f)
