"""Read and write settings as kohya_ss JSON config files (and our presets).

Loading: old kohya_ss keys are migrated in numbered steps, string-typed
numbers are read, keys we do not know are kept aside and reported in one
warning, missing keys take the defaults (or the values of ``base``, the way
kohya_ss layers a preset over the form). Every invalid value is reported at
once, each naming its field. Saving writes flat, sorted kohya keys.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from trainer.problems import NekoyaError, Problem

from .config_file import ConfigFileError, read_config_json
from .known_models import CUSTOM, QUICK_PICK_CHOICES
from .kohya_unused import is_kohya_unused
from .model import TrainingSettings, is_setting, setting_info


class SettingsError(NekoyaError, ValueError):
    """Invalid settings: ``problems`` holds one Problem per bad value (its ``field`` the key when a setting
    is to blame), ``lines`` the same as the text the CLI and the preset panel show."""

    def __init__(self, problems: list[Problem], source: str = ""):
        self.problems = problems
        self.lines = [settings_line(p) for p in problems]
        where = f" in {source}" if source else ""
        super().__init__(f"{len(problems)} invalid setting(s){where}:\n" + "\n".join(f"  - {p}" for p in self.lines))


def settings_line(problem: Problem) -> str:
    """``network_dim (Network Rank, Parameters tab): 0 is not allowed ...``: the key, label and tab, then the message."""
    if problem.field and is_setting(problem.field):
        info = setting_info(problem.field)
        return f"{problem.field} ({info.label}, {info.tab} tab): {problem.message}"
    return problem.message


def _invalid(message: str, field: str | None = None, file: str | None = None) -> Problem:
    return Problem("error", field, message, file=file)


@dataclass
class LoadReport:
    settings: TrainingSettings
    unknown_keys: list[str] = field(default_factory=list)  # not kohya_ss keys we know of
    unused_keys: list[str] = field(default_factory=list)  # kohya_ss keys Nekoya does not use
    notes: list[str] = field(default_factory=list)  # what the migrations changed

    def warnings(self) -> list[str]:
        out = list(self.notes)
        if self.unknown_keys:
            out.append("Unknown keys kept aside (saved back unchanged, not used): " + ", ".join(self.unknown_keys))
        if self.unused_keys:
            out.append("kohya_ss settings Nekoya does not use (kept in the file): " + ", ".join(self.unused_keys))
        return out


# --- migrations of old kohya_ss keys, applied in order ---------------------------------


def _m1_lora_network_weights(d: dict, notes: list[str]) -> None:
    if "lora_network_weights" in d:
        old = d.pop("lora_network_weights")
        if not d.get("network_weights"):
            d["network_weights"] = old
        notes.append("Renamed lora_network_weights to network_weights.")


def _m2_use_wandb(d: dict, notes: list[str]) -> None:
    if "use_wandb" in d:
        flag = str(d.pop("use_wandb")).strip().lower() == "true"
        if flag and not d.get("log_with"):
            d["log_with"] = "wandb"
            notes.append("use_wandb became log_with = wandb.")


def _m3_xformers_bool(d: dict, notes: list[str]) -> None:
    value = d.get("xformers")
    if isinstance(value, bool) or value in ("True", "False", "true", "false"):
        d["xformers"] = "xformers" if str(value).lower() == "true" else "none"
        notes.append(f"CrossAttention (xformers) {value!r} became {d['xformers']!r}.")


def _m4_stop_te_pct(d: dict, notes: list[str]) -> None:
    if "stop_text_encoder_training_pct" in d:
        old = d.pop("stop_text_encoder_training_pct")
        d.setdefault("stop_text_encoder_training", old)


def _m5_use_8bit_adam(d: dict, notes: list[str]) -> None:
    if "use_8bit_adam" in d:
        flag = str(d.pop("use_8bit_adam")).strip().lower() == "true"
        if not d.get("optimizer"):
            d["optimizer"] = "AdamW8bit" if flag else "AdamW"
            notes.append(f"use_8bit_adam became optimizer = {d['optimizer']}.")


def _m6_locon_name(d: dict, notes: list[str]) -> None:
    if d.get("LoRA_type") == "LoCon":
        d["LoRA_type"] = "LyCORIS/LoCon"
        notes.append("LoRA type LoCon became LyCORIS/LoCon.")


def _m7_save_model_as(d: dict, notes: list[str]) -> None:
    value = d.get("save_model_as")
    if value not in (None, "", "safetensors", "ckpt"):
        d["save_model_as"] = "safetensors"
        notes.append(f"Save trained model as {value!r} is not a LoRA format; using safetensors.")


def _m8_numeric_text_defaults(d: dict, notes: list[str]) -> None:
    # kohya_ss wrote "" for "not set" in numeric text boxes; an unset scheduler cycle count means 1.
    if d.get("lr_scheduler_num_cycles") == "":
        d.pop("lr_scheduler_num_cycles")


def _m9_model_list(d: dict, notes: list[str]) -> None:
    # kohya_ss: an empty or unknown quick pick means the path field holds a custom model.
    if "model_list" in d and d["model_list"] not in QUICK_PICK_CHOICES:
        d["model_list"] = CUSTOM


def _m10_conv_block_names(d: dict, notes: list[str]) -> None:
    # kohya_ss v21-v22 called the per-block conv ranks conv_dims / conv_alphas (later conv_block_dims/alphas)
    for old, new in (("conv_dims", "conv_block_dims"), ("conv_alphas", "conv_block_alphas")):
        if old in d:
            value = d.pop(old)
            if value not in (None, "") and not d.get(new):
                d[new] = value
                notes.append(f"{old} became {new}.")


MIGRATIONS: tuple[Callable[[dict, list[str]], None], ...] = (
    _m1_lora_network_weights, _m2_use_wandb, _m3_xformers_bool, _m4_stop_te_pct,
    _m5_use_8bit_adam, _m6_locon_name, _m7_save_model_as, _m8_numeric_text_defaults, _m9_model_list,
    _m10_conv_block_names,
)


# --- load -----------------------------------------------------------------------------


def settings_from_dict(data: dict[str, Any], base: TrainingSettings | None = None, source: str = "") -> LoadReport:
    """Build settings from a kohya_ss-style dict. Raises SettingsError listing every bad value."""
    if not isinstance(data, dict):
        raise SettingsError([_invalid(f"the file must hold a JSON object of settings, not {type(data).__name__}")], source)
    d = dict(data)
    notes: list[str] = []
    for migrate in MIGRATIONS:
        migrate(d, notes)
    d = {k: v for k, v in d.items() if v is not None}  # null keeps the current value, as in kohya_ss
    known = {k: v for k, v in d.items() if is_setting(k)}
    others = {k: v for k, v in d.items() if not is_setting(k)}
    merged = {**(_dump_known(base) if base is not None else {}), **known}
    kept = {**(base.kept_kohya_values() if base is not None else {}), **others}
    try:
        settings = TrainingSettings(**merged, **kept)
    except ValidationError as err:
        raise SettingsError(describe_validation_error(err, merged), source) from None
    unknown = sorted(k for k in others if not is_kohya_unused(k))
    unused = sorted(k for k in others if is_kohya_unused(k))
    return LoadReport(settings, unknown, unused, notes)


def read_settings_file(path: str | os.PathLike, base: TrainingSettings | None = None) -> LoadReport:
    """Load a kohya_ss config file (read safely: see ``config_file``). Raises SettingsError."""
    try:
        data = read_config_json(path)
    except ConfigFileError as err:
        raise SettingsError([_invalid(str(err), file=str(path))]) from None
    return settings_from_dict(data, base=base, source=str(path))


def why_not_a_config(path: str | os.PathLike) -> str | None:
    """Why the existing file at ``path`` is not a kohya_ss/Nekoya config (so no save may replace it), or None."""
    try:
        data = read_config_json(path)
    except ConfigFileError as err:
        return str(err)
    if not isinstance(data, dict):
        return f"{str(path)!r} holds a JSON {type(data).__name__}, not a kohya_ss config"
    if not any(is_setting(k) or is_kohya_unused(k) for k in data):
        return f"{str(path)!r} is a JSON file without any kohya_ss setting, not a config"
    return None


def describe_validation_error(err: ValidationError, given: dict[str, Any]) -> list[Problem]:
    problems = []
    for e in err.errors():
        key = str(e["loc"][0]) if e["loc"] else "?"
        if not is_setting(key):
            problems.append(_invalid(f"{key}: {e['msg']}"))
            continue
        info = setting_info(key)
        value = given.get(key, e.get("input"))
        if e["type"] == "value_error":  # our own checks say what to do
            problems.append(_invalid(f"{value!r}: {e['msg'].removeprefix('Value error, ')}.", key))
        else:
            problems.append(_invalid(f"{value!r} is not allowed ({e['msg'].lower()}); expected {info.describe_allowed()}.",
                                     key))
    return problems


def apply_overrides(settings: TrainingSettings, assignments: list[str]) -> TrainingSettings:
    """Apply CLI ``KEY=VALUE`` overrides; unknown keys and bad values raise SettingsError."""
    changes: dict[str, Any] = {}
    problems = []
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            problems.append(_invalid(f"--set {item!r}: write KEY=VALUE, e.g. --set network_dim=16"))
        elif not is_setting(key):
            problems.append(_invalid(f"--set {key}: no such setting (see `python -m trainer config` for the keys)"))
        else:
            changes[key] = value
    if problems:
        raise SettingsError(problems, "--set")
    return settings_from_dict(changes, base=settings, source="--set").settings


# --- save -------------------------------------------------------------------------------


def settings_to_dict(settings: TrainingSettings) -> dict[str, Any]:
    """Flat kohya_ss dict with sorted keys, kept-aside keys included."""
    data = {**settings.kept_kohya_values(), **_dump_known(settings)}
    return dict(sorted(data.items()))


def settings_to_json(settings: TrainingSettings) -> str:
    return json.dumps(settings_to_dict(settings), indent=2, ensure_ascii=False) + "\n"


def save_settings(settings: TrainingSettings, path: str | os.PathLike) -> Path:
    """Write the settings as a kohya_ss config file, atomically (never a half-written file)."""
    from trainer.safety import atomic_write_text

    path = Path(path)
    atomic_write_text(path, settings_to_json(settings))
    return path


def _dump_known(settings: TrainingSettings) -> dict[str, Any]:
    return {k: getattr(settings, k) for k in TrainingSettings.model_fields}
