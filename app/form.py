"""Form values <-> settings: the one place widget values become ``TrainingSettings``.

The form is a ``dict[str, value]`` keyed by setting name (the kohya_ss JSON key),
exactly what the widgets hold. Nothing here imports gradio, so every handler's
logic is testable as plain Python.
"""
from __future__ import annotations

from typing import Any, Mapping

from pydantic import ValidationError

from trainer.settings import (
    SettingsError,
    TrainingSettings,
    setting_info,
    setting_infos,
    settings_from_dict,
)

FORM_SOURCE = "the form"


def setting_keys() -> list[str]:
    return [info.key for info in setting_infos()]


def form_values(settings: TrainingSettings) -> dict[str, Any]:
    """The widget value of every setting."""
    return {key: to_widget_value(key, getattr(settings, key)) for key in setting_keys()}


def to_widget_value(key: str, value: Any) -> Any:
    # Sliders and numbers hold floats for float settings; ints stay ints so "8" never shows as "8.0".
    if setting_info(key).type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def settings_from_form(values: Mapping[str, Any], kept: Mapping[str, Any] | None = None) -> TrainingSettings:
    """Validate the form. ``kept``: kohya keys of a loaded config that have no widget,
    carried along so a saved file keeps them. Raises SettingsError naming every bad field."""
    known = {k: v for k, v in values.items() if k in _key_set()}
    return settings_from_dict({**(kept or {}), **known}, source=FORM_SOURCE).settings


def valid_part_of_form(values: Mapping[str, Any], kept: Mapping[str, Any] | None = None) -> tuple[TrainingSettings, list[str]]:
    """Settings from the form with the invalid fields left at their defaults, and those fields' keys.

    A preset is layered over the current form (as kohya_ss does); a half-typed value
    elsewhere in the form must not stop the preset from loading.
    """
    data = {k: v for k, v in values.items() if k in _key_set()}
    dropped = _invalid_keys(data)
    data = {k: v for k, v in data.items() if k not in dropped}
    try:
        return settings_from_dict({**(kept or {}), **data}, source=FORM_SOURCE).settings, dropped
    except SettingsError:  # only a rule between two fields can still fail: start from the defaults
        return TrainingSettings(), sorted(data)


def _invalid_keys(data: Mapping[str, Any]) -> list[str]:
    try:
        TrainingSettings(**data)
    except ValidationError as err:
        return sorted({str(e["loc"][0]) for e in err.errors() if e["loc"]})
    return []


_KEYS: frozenset[str] | None = None


def _key_set() -> frozenset[str]:
    global _KEYS
    if _KEYS is None:
        _KEYS = frozenset(setting_keys())
    return _KEYS
