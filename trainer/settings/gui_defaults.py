"""kohya_ss's GUI defaults file (``config.toml``, ``kohya_gui.py --config``): its sections pre-fill the form.

Keys that are Nekoya settings become the form's defaults; the others (model and preset folders, Dreambooth-only
learning rates, shell use...) are named, so ``launch.py --config`` says what it applied and what it did not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.problems import NekoyaError

from .kohya_json import SettingsError, settings_from_dict
from .model import TrainingSettings, is_setting


class GuiDefaultsError(NekoyaError, ValueError):
    """The defaults file cannot be used; the message names the file and the fix."""


@dataclass
class GuiDefaults:
    settings: TrainingSettings
    applied: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def read_gui_defaults(path: str | Path) -> GuiDefaults:
    path = Path(path).expanduser()
    if not path.is_file():
        raise GuiDefaultsError(f"--config {path}: no such file; give kohya_ss's config.toml (a copy of "
                               "'config example.toml') or leave --config out")
    try:
        sections = _read_toml(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GuiDefaultsError(f"--config {path}: not a readable TOML file ({exc})") from None
    values: dict[str, Any] = {}
    for section in sections.values():
        if isinstance(section, dict):
            values.update(section)
    applied = sorted(k for k in values if is_setting(k))
    try:
        report = settings_from_dict({k: values[k] for k in applied}, source=str(path))
    except SettingsError as err:
        raise GuiDefaultsError(f"--config {path}: " + "; ".join(err.lines)) from None
    return GuiDefaults(report.settings, applied, sorted(k for k in values if not is_setting(k)))


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import toml

        return toml.load(path)
    with open(path, "rb") as f:
        return tomllib.load(f)
