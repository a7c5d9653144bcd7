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
# Family names a detector may report, and the flags each implies.
FAMILY_FLAGS = {
    "sd1": (False, False, False), "sd15": (False, False, False),
    "sd2": (True, False, False), "sd21": (True, False, False), "sd21_base": (True, False, False),
    "sd2v": (True, True, False), "sd2_v": (True, True, False),
    "sdxl": (False, False, True), "sdxl_base": (False, False, True),
}
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
    detected = detect_flags(path)
    if detected is None:
        return values, "Could not tell the model family from the file; check v2 / v_parameterization / SDXL yourself."
    return {**values, **dict(zip(FLAG_KEYS, detected))}, f"Detected {FLAG_NAMES.get(detected, 'the family')} from the file."


def detect_flags(path: str) -> tuple[bool, bool, bool] | None:
    """(v2, v_parameterization, sdxl) read from the checkpoint, or None when it cannot be told."""
    try:
        from trainer.checkpoints import detect  # written separately; absent in older trees
    except ImportError:
        return None
    try:
        result = detect(path)
    except Exception:  # a broken file is reported by preflight, not here
        return None
    return _flags_of(result)


def _flags_of(result: Any) -> tuple[bool, bool, bool] | None:
    if result is None:
        return None
    if isinstance(result, str):
        return FAMILY_FLAGS.get(result.lower())
    if isinstance(result, tuple) and len(result) == 3 and all(isinstance(x, bool) for x in result):
        return result
    if all(hasattr(result, k) for k in FLAG_KEYS):
        return tuple(bool(getattr(result, k)) for k in FLAG_KEYS)  # type: ignore[return-value]
    for attr in ("family", "name", "kind"):
        value = getattr(result, attr, None)
        if isinstance(value, str) and value.lower() in FAMILY_FLAGS:
            return FAMILY_FLAGS[value.lower()]
    return None
