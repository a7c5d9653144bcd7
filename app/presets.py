"""Preset and config files: listing the preset folders, loading over the form, saving.

A preset is a (usually partial) kohya_ss config. Loading layers it over the
current form like kohya_ss does (keys the file lacks keep their values) and says
what changed and which keys were not understood. Plain Python, no gradio.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from trainer.settings import SettingsError, read_settings_file, save_settings, setting_info

from .form import form_values, settings_from_form, valid_part_of_form

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "presets"
USER_PRESETS_DIR = PRESETS_DIR / "user"
USER_PRESETS_ENV = "NEKOYA_USER_PRESETS"
USER_PREFIX = "user/"
MAX_CHANGES_LISTED = 12
_BAD_NAME = re.compile(r'[<>:"|?*\x00-\x1f]')


def default_user_presets_dir() -> Path:
    """``$NEKOYA_USER_PRESETS`` when set, else ``presets/user``."""
    configured = os.environ.get(USER_PRESETS_ENV, "").strip()
    return Path(configured).expanduser() if configured else USER_PRESETS_DIR


@dataclass(frozen=True)
class PresetFolders:
    shipped: Path = PRESETS_DIR
    user: Path = USER_PRESETS_DIR

    def listing(self) -> dict[str, Path]:
        """Label -> file: the shipped presets by name, then the user's as ``user/<name>``."""
        found = {p.stem: p for p in _json_files(self.shipped)}
        found.update({USER_PREFIX + p.stem: p for p in _json_files(self.user)})
        return found

    def path_of(self, label: str) -> Path | None:
        return self.listing().get(label)

    def save_target(self, name: str) -> Path:
        """Where "Save" writes: a bare name goes to the user folder, a path is used as given."""
        name = name.strip().removeprefix(USER_PREFIX)  # a listed user preset's label saves over that preset
        if not name:
            raise ValueError("type a preset name (saved in the user presets folder) or a file path")
        if _BAD_NAME.search(name):
            raise ValueError(f"{name!r} has characters a file name cannot have")
        is_path = "/" in name or "\\" in name or name.startswith("~")
        path = Path(name).expanduser() if is_path else self.user / name
        return path if path.suffix.lower() == ".json" else path.with_name(path.name + ".json")


def _json_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("*.json") if p.is_file()), key=lambda p: p.stem.lower())


@dataclass
class LoadOutcome:
    """What loading a file did to the form: new values, kept kohya keys and messages for the page."""

    ok: bool
    values: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # unknown keys, migrations, reset fields
    problems: list[str] = field(default_factory=list)


def load_over_form(path: str | os.PathLike, values: Mapping[str, Any], kept: Mapping[str, Any] | None = None) -> LoadOutcome:
    """Read a preset or kohya_ss config and layer it over the current form values."""
    base, reset = valid_part_of_form(values, kept)
    try:
        report = read_settings_file(path, base=base)
    except SettingsError as err:
        return LoadOutcome(ok=False, problems=list(err.problems))
    new_values = form_values(report.settings)
    name = Path(path).stem
    messages = [f"Loaded {name!r}: " + describe_changes(values, new_values)]
    warnings = report.warnings()
    if reset:
        warnings.append("These fields held invalid values and were reset: " + ", ".join(_labels(reset)))
    return LoadOutcome(True, new_values, report.settings.kept_kohya_values(), messages, warnings)


def save_form(path: Path, values: Mapping[str, Any], kept: Mapping[str, Any] | None = None) -> Path:
    """Validate the form and write it as a kohya_ss config file. Raises SettingsError."""
    return save_settings(settings_from_form(values, kept), path)


def describe_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    changed = [k for k in after if before.get(k) != after[k]]
    if not changed:
        return "no setting changed (the form already had these values)."
    shown = [f"{setting_info(k).label} {_short(before.get(k))} → {_short(after[k])}" for k in changed[:MAX_CHANGES_LISTED]]
    more = f" and {len(changed) - MAX_CHANGES_LISTED} more" if len(changed) > MAX_CHANGES_LISTED else ""
    return f"{len(changed)} setting(s) changed: " + "; ".join(shown) + more + "."


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "…"


def _labels(keys: list[str]) -> list[str]:
    return [f"{setting_info(k).label} ({setting_info(k).tab})" for k in keys]
