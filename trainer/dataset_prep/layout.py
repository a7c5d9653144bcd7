"""Names and places of kohya's prepared dataset: ``<dest>/img``, ``reg``, ``log``, ``model``.

Also the checks made before anything is copied: prompts usable as folder names,
repeats in range, and no overlap between a source folder and the destination.
"""
from __future__ import annotations

import os
from pathlib import Path

from trainer.problems import NekoyaError

IMG, REG, LOG, MODEL = "img", "reg", "log", "model"

# Characters Windows refuses in file names; the prepared folder must also open there.
_FORBIDDEN_NAME_CHARS = frozenset('<>:"/\\|?*')


class DatasetPrepError(NekoyaError, ValueError):
    """The request cannot be carried out as given; the message says why and what to change."""


def instance_includes_class(instance_prompt: str, class_prompt: str) -> bool:
    """True for instance "sks girl" with class "girl": the class is already the prompt's last word(s)."""
    instance, klass = instance_prompt.strip().lower().split(), class_prompt.strip().lower().split()
    return bool(klass) and len(instance) > len(klass) and instance[-len(klass):] == klass


def concept_folder_name(repeats: int, instance_prompt: str, class_prompt: str) -> str:
    """kohya's training concept folder ``<repeats>_<instance> <class>``: ``40_sks girl``.

    An instance prompt that already ends with the class ("sks girl" + "girl") is not
    doubled into "sks girl girl".
    """
    instance, klass = instance_prompt.strip(), class_prompt.strip()
    if instance_includes_class(instance, klass):
        return f"{repeats}_{instance}"
    return f"{repeats}_{instance} {klass}".rstrip()


def reg_folder_name(repeats: int, class_prompt: str) -> str:
    """kohya's regularisation concept folder: ``1_girl``."""
    return f"{repeats}_{class_prompt.strip()}"


def folder_settings(destination: str | os.PathLike) -> dict[str, str]:
    """The Folders tab values for a prepared destination, keyed by the settings' kohya keys.

    As kohya's "Copy info to respective fields": the reg folder only when it exists.
    """
    dest = Path(destination).absolute()
    reg = dest / REG
    return {
        "train_data_dir": str(dest / IMG),
        "reg_data_dir": str(reg) if reg.is_dir() else "",
        "output_dir": str(dest / MODEL),
        "logging_dir": str(dest / LOG),
    }


def check_prompt(label: str, prompt: str) -> str:
    """The prompt stripped, or DatasetPrepError when it cannot be part of a folder name."""
    text = (prompt or "").strip()
    if not text:
        raise DatasetPrepError(f"{label} is required (it becomes part of the folder name and the fallback caption)")
    bad = sorted({ch for ch in text if ch in _FORBIDDEN_NAME_CHARS or ord(ch) < 32})
    if bad:
        shown = " ".join(repr(ch) for ch in bad)
        raise DatasetPrepError(f"{label} '{text}' contains characters a folder name cannot hold: {shown}")
    if text.endswith("."):
        raise DatasetPrepError(f"{label} '{text}' ends with a dot, which Windows drops from folder names")
    return text


def check_repeats(label: str, repeats, minimum: int) -> int:
    """A whole number of at least ``minimum``; ``40.0`` (a GUI number box) counts as 40."""
    try:
        value = float(repeats)
    except (TypeError, ValueError):
        raise DatasetPrepError(f"{label} must be a whole number (got {repeats!r})") from None
    if not value.is_integer():
        raise DatasetPrepError(f"{label} must be a whole number (got {repeats!r})")
    if value < minimum:
        raise DatasetPrepError(f"{label} must be at least {minimum} (got {int(value)})")
    return int(value)


def check_source_dir(label: str, folder: str | os.PathLike) -> Path:
    path = Path(folder).expanduser() if folder else None
    if path is None:
        raise DatasetPrepError(f"{label} is not set")
    if not path.is_dir():
        raise DatasetPrepError(f"{label} does not exist or is not a folder: {path}")
    return path


def check_no_overlap(source_label: str, source: Path, destination: Path) -> None:
    """Refuse a destination inside the source, the source inside the destination, or both the same.

    Compared after resolving links, so a symlinked path cannot slip past.
    """
    src, dest = source.resolve(), destination.resolve()
    if src == dest:
        raise DatasetPrepError(
            f"the destination {destination} is the {source_label} folder itself; "
            "choose a new, separate destination folder (the source images are never modified)")
    if dest.is_relative_to(src):
        raise DatasetPrepError(
            f"the destination {destination} is inside the {source_label} folder {source}; "
            f"choose a destination outside it, e.g. {source.parent / (source.name + '_prepared')}")
    if src.is_relative_to(dest):
        raise DatasetPrepError(
            f"the {source_label} folder {source} is inside the destination {destination}; "
            "choose a destination that does not contain your source images")


def check_distinct_sources(train_source: Path, reg_source: Path) -> None:
    a, b = train_source.resolve(), reg_source.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise DatasetPrepError(
            f"the training images folder {train_source} and the regularisation images folder {reg_source} "
            "overlap; regularisation images must be other images of the class, in their own folder")
