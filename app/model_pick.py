"""Model quick pick and custom paths -> the v2 / v_parameterization / SDXL flags.

A known name sets the flags the way kohya_ss does. For a custom path the
checkpoint is inspected (``trainer.checkpoints.detect``, a cheap header read) when
that function exists; otherwise the flags stay as the user set them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.settings import CUSTOM, family_flags

FLAG_KEYS = ("v2", "v_parameterization", "sdxl")
# Families trainer.checkpoints.detect reports, and the flags each implies (v-prediction read separately).
FAMILY_FLAGS = {"sd1": (False, False, False), "sd2": (True, False, False), "sdxl": (False, False, True)}
UNKNOWN_NOTE = "Could not tell the model family from the file; check v2 / v_parameterization / SDXL yourself."
FLAG_NAMES = {(False, False, False): "SD 1.x", (True, False, False): "SD 2.x", (True, True, False): "SD 2.x v-prediction",
              (False, False, True): "SDXL"}


def on_quick_pick(name: str) -> tuple[dict[str, Any], str]:
    """Values to set when the quick pick changes, and a note for the page."""
    flags = family_flags(name)
    if flags is None:  # "custom": the path field and the flags are the user's
        return {}, "Custom model: type its path below and check the v2 / v_parameterization / SDXL boxes."
    return {"pretrained_model_name_or_path": name, **dict(zip(FLAG_KEYS, flags))}, f"{name}: {FLAG_NAMES[flags]}."


def on_model_path(path: str) -> tuple[dict[str, Any], str]:
    """Values to set when the model path is edited: the quick pick follows, flags when known."""
    path = (path or "").strip()
    flags = family_flags(path)
    if flags is not None:
        return {"model_list": path, **dict(zip(FLAG_KEYS, flags))}, f"{path}: {FLAG_NAMES[flags]}."
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
    known = tuple(flags.get(k, False) for k in FLAG_KEYS)
    name = FLAG_NAMES.get(known, "the family")
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
    if not isinstance(family, str) or family.lower() not in FAMILY_FLAGS:
        return {}
    flags = dict(zip(FLAG_KEYS, FAMILY_FLAGS[family.lower()]))
    if vpred is None and family.lower() == "sd2":
        del flags["v_parameterization"]  # SD2 single files do not say; keep the user's choice
    elif vpred is not None:
        flags["v_parameterization"] = bool(vpred)
    return flags
