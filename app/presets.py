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

from trainer.safety import SaveError
from trainer.settings import SettingsError, read_settings_file, save_settings, setting_info
from trainer.settings.kohya_json import why_not_a_config

from .form import form_values, settings_from_form, valid_part_of_form

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "presets"
USER_PRESETS_DIR = PRESETS_DIR / "user"
USER_PRESETS_ENV = "NEKOYA_USER_PRESETS"
USER_PREFIX = "user/"
MAX_CHANGES_LISTED = 12
SAVE_FIELD = "Save as"
_BAD_NAME = re.compile(r'[<>:"|?*\x00-\x1f]')
_RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


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
        """Where "Save" writes: a plain name goes to the user folder, a full path (absolute or ~/...) as given."""
        name = name.strip().removeprefix(USER_PREFIX)  # a listed user preset's label saves over that preset
        if not name:
            raise ValueError(f"{SAVE_FIELD}: type a preset name (saved in {self.user}) or a full path ending in .json")
        expanded = Path(name).expanduser()
        if expanded.is_absolute():
            if name.endswith(("/", "\\")) or "/" not in name and "\\" not in name:  # "/x/", "~", "~bob"
                raise ValueError(f"{SAVE_FIELD}: {name!r} names a folder: add the file name, e.g. {name.rstrip('/')}/my_run.json")
            _check_file_name(expanded.name, name)
            path = expanded
        elif "/" in name or "\\" in name or name.startswith("~"):
            raise ValueError(f"{SAVE_FIELD}: {name!r} is neither a plain name nor a full path: "
                             f"type a name such as my_run (saved in {self.user}) or a full path such as /home/me/my_run.json")
        else:
            _check_file_name(name, name)
            path = self.user / name
        return path if path.suffix.lower() == ".json" else path.with_name(path.name + ".json")


def _check_file_name(file_name: str, typed: str) -> None:
    """Refuse names that would leave the folder, hide the file or that Windows cannot store."""
    fix = "type a name such as my_run"
    if _BAD_NAME.search(file_name):
        raise ValueError(f'{SAVE_FIELD}: {typed!r} has characters a file name cannot have (< > : " | ? * or control '
                         f"characters): {fix}")
    if file_name.startswith(".") or file_name.endswith("."):
        raise ValueError(f"{SAVE_FIELD}: {typed!r} cannot start or end with '.' (that names a folder or a hidden "
                         f"file): {fix}")
    if file_name.split(".")[0].upper() in _RESERVED_NAMES:
        raise ValueError(f"{SAVE_FIELD}: {typed!r} is a name Windows reserves for devices: {fix}")


def _json_files(folder: Path) -> list[Path]:
    """The folder's .json files, without reading them: a bad one is reported when it is loaded."""
    try:
        found = [p for p in folder.glob("*.json") if p.is_file()]  # no FIFOs, devices or folders
    except OSError:  # an unreadable or vanished folder lists nothing rather than breaking the page
        return []
    return sorted(found, key=lambda p: p.stem.lower())


@dataclass
class LoadOutcome:
    """What loading a file did to the form: new values, kept kohya keys and messages for the page."""

    ok: bool
    values: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # unknown keys, migrations, reset fields
    problems: list[str] = field(default_factory=list)


def load_preset(folders: PresetFolders, label: str | None, values: Mapping[str, Any],
                kept: Mapping[str, Any] | None = None, again: bool = False) -> LoadOutcome:
    """Load the picked preset. Picking loads it at once (as kohya_ss's Presets do); ``again`` is the
    "Load again" button, which re-applies it after the form was edited."""
    path = folders.path_of(label) if label else None
    if path is None:
        return LoadOutcome(False, problems=[f"Pick a preset first (no preset named {label!r})." if label else "Pick a preset first."])
    return load_over_form(path, values, kept, name=label, again=again)


def load_over_form(path: str | os.PathLike, values: Mapping[str, Any], kept: Mapping[str, Any] | None = None,
                   name: str | None = None, again: bool = False) -> LoadOutcome:
    """Read a preset or kohya_ss config and layer it over the current form values."""
    base, reset = valid_part_of_form(values, kept)
    try:
        report = read_settings_file(path, base=base)
    except SettingsError as err:
        return LoadOutcome(ok=False, problems=list(err.lines))
    new_values = form_values(report.settings)
    title = f"Loaded {name or Path(path).stem!r}" + (" again" if again else "")
    changes = describe_changes(values, new_values)
    if again and not _changed(values, new_values):
        changes = "the form still has all its values (picking a preset loads it; Load again re-applies it after edits)."
    warnings = report.warnings()
    if reset:
        warnings.append("These fields held invalid values and were reset: " + ", ".join(_labels(reset)))
    return LoadOutcome(True, new_values, report.settings.kept_kohya_values(), [f"{title}: {changes}"], warnings)


def save_form(path: Path, values: Mapping[str, Any], kept: Mapping[str, Any] | None = None) -> Path:
    """Validate the form and write it as a kohya_ss config file. Raises SettingsError."""
    return save_settings(settings_from_form(values, kept), path)


@dataclass
class SaveOutcome:
    """What "Save" did, for the page; ``pending`` is the existing file the next Save may replace."""

    ok: bool
    messages: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    pending: str | None = None


def save_preset(folders: PresetFolders, name: str, values: Mapping[str, Any], kept: Mapping[str, Any] | None = None,
                confirmed: str | None = None) -> SaveOutcome:
    """Save the form under ``name``. An existing config is replaced only when ``confirmed`` names it
    (the second press of Save); a file that is not a config is never replaced."""
    try:
        target = folders.save_target(name)
        settings = settings_from_form(values, kept)
    except ValueError as err:  # SettingsError is a ValueError too
        return SaveOutcome(False, problems=["Not saved: fix these first.", *getattr(err, "lines", [str(err)])])
    refusal = _refusal(target, folders.user)
    if refusal:
        return SaveOutcome(False, problems=[f"Not saved: {refusal}"])
    exists = os.path.lexists(target)
    if exists and confirmed != str(target):
        return SaveOutcome(False, warnings=[f"{target} exists; press Save again to replace it."], pending=str(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # only the user presets folder may be missing here
        save_settings(settings, target)
    except OSError as err:  # SaveError says what happened and that the previous file is intact
        return SaveOutcome(False, problems=[f"Not saved: {err if isinstance(err, SaveError) else err.strerror or err}"])
    return SaveOutcome(True, messages=[f"{'Replaced' if exists else 'Saved'} {target}"])


def _refusal(target: Path, user_folder: Path) -> str | None:
    """Why Save must not write ``target``: a file there that is not a config, or a missing folder."""
    if os.path.lexists(target):
        reason = why_not_a_config(target)
        return f"{reason}. Save never replaces such a file: type another name." if reason else None
    folder = target.parent
    if folder != user_folder and not folder.is_dir():
        return f"the folder {folder} does not exist: create it first, or type a plain name to save in {user_folder}."
    return None


def _changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    return [k for k in after if before.get(k) != after[k]]


def describe_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    changed = _changed(before, after)
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
