"""Model quick pick and custom paths -> the v2 / v_parameterization / SDXL flags.

A known name sets the flags the way kohya_ss does. For a custom path the
checkpoint is inspected (``trainer.checkpoints.detect``, a cheap header read) when
that function exists; otherwise the flags stay as the user set them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.families import FLAG_KEYS, spec_for_checkpoint, spec_for_flags
from trainer.settings import CUSTOM, family_flags

UNKNOWN_NOTE = "Could not tell the model family from the file; check v2 / v_parameterization / SDXL yourself."


def flags_name(flags: dict[str, bool]) -> str:
    """What people call the model kohya's checkboxes describe ("SD 2.x v-prediction")."""
    return spec_for_flags(flags).display_name(bool(flags.get("v_parameterization")))


def on_quick_pick(name: str) -> tuple[dict[str, Any], str]:
    """Values to set when the quick pick changes, and a note for the page."""
    flags = family_flags(name)
    if flags is None:  # "custom": the path field and the flags are the user's
        return {}, "Custom model: type its path below and check the v2 / v_parameterization / SDXL boxes."
    values = dict(zip(FLAG_KEYS, flags))
    return {"pretrained_model_name_or_path": name, **values}, f"{name}: {flags_name(values)}."


def on_model_path(path: str) -> tuple[dict[str, Any], str]:
    """Values to set when the model path is edited: the quick pick follows, flags when known."""
    path = (path or "").strip()
    flags = family_flags(path)
    if flags is not None:
        values = dict(zip(FLAG_KEYS, flags))
        return {"model_list": path, **values}, f"{path}: {flags_name(values)}."
    values: dict[str, Any] = {"model_list": CUSTOM}
    if not path:
        return values, ""
    if not Path(path).expanduser().exists():
        return values, f"Not found on this computer: {path}"
    detected, note = detect_flags(str(Path(path).expanduser()))
    return {**values, **detected}, note


def detect_flags(path: str) -> tuple[dict[str, bool], str]:
    """The family flags read from the checkpoint (only those it tells) and a note for the page."""
    try:
        from trainer.checkpoints import detect  # a cheap header read
    except ImportError:
        return {}, UNKNOWN_NOTE
    try:
        info = detect(path)
    except Exception as err:  # unreadable file: preflight explains it in full
        return {}, f"Could not read the model: {err}"
    problems = getattr(info, "problems", ())
    if problems:
        return {}, "This is not a usable base model: " + "; ".join(problems)
    flags = _flags_of(info)
    if not flags:
        return {}, UNKNOWN_NOTE
    name = flags_name(flags)
    if "v_parameterization" not in flags:
        name += " (whether it is v-prediction cannot be told: check v_parameterization for 768-px v models)"
    return flags, f"Detected {name} from the model."


def _flags_of(result: Any) -> dict[str, bool]:
    """Flags from a detector result: a ModelInfo-like object (family + v_parameterization) or a family name."""
    if result is None:
        return {}
    if isinstance(result, str):
        family, vpred = result, None
    else:
        family, vpred = getattr(result, "family", None), getattr(result, "v_parameterization", None)
    if not isinstance(family, str):
        return {}
    try:
        spec = spec_for_checkpoint(family.lower())
    except ValueError:
        return {}
    flags = dict(spec.flags)
    if vpred is not None:
        flags["v_parameterization"] = bool(vpred)
    elif spec.files_tell_prediction:
        flags["v_parameterization"] = False
    # else the file cannot say (SD2 single files): keep the user's choice
    return flags
