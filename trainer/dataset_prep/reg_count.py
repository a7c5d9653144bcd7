"""How many regularisation images exist against the requested "Total Number of Class/Reg Images".

The GUI generates the missing ones (``generate_reg_images``) into ``target_folder``.
Images are counted by extension only (no decoding), so this is instant.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trainer.data.folders import is_image_file, parse_concept_folder_name

from .layout import DatasetPrepError, check_repeats


@dataclass(frozen=True)
class RegImageCount:
    folder: Path
    requested: int
    per_folder: dict[str, int]  # "." for images directly in ``folder``, else the concept folder's name
    target_folder: Path | None  # where new images go; None when several class folders make it ambiguous

    @property
    def existing(self) -> int:
        return sum(self.per_folder.values())

    @property
    def missing(self) -> int:
        return max(0, self.requested - self.existing)

    @property
    def summary(self) -> str:
        text = f"{self.existing} regularisation image(s) in {self.folder}, {self.requested} requested"
        if len(self.per_folder) > 1:
            text += " (" + ", ".join(f"{name}: {count}" for name, count in self.per_folder.items()) + ")"
        if not self.missing:
            return text + ": none missing"
        if self.target_folder is None:
            return text + (f": {self.missing} missing; the folder holds several class folders, "
                           "choose the one to generate into")
        return text + f": {self.missing} missing, to be generated into {self.target_folder}"


def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def count_reg_images(reg_dir: str | os.PathLike, requested_total) -> RegImageCount:
    """Images in ``reg_dir`` itself and in its ``<repeats>_<class>`` folders, against ``requested_total``.

    A folder that does not exist yet counts as empty (it is where generation will
    write). ``target_folder`` is ``reg_dir`` when images lie directly in it or it has no
    class folders, else its single class folder.
    """
    requested = check_repeats("Total number of regularisation images", requested_total, 0)
    if not reg_dir or not str(reg_dir).strip():
        raise DatasetPrepError("the regularisation images folder is not set")
    folder = Path(reg_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DatasetPrepError(f"{folder} is a file, not a folder")
    if not folder.exists():
        return RegImageCount(folder, requested, {}, folder)
    per_folder: dict[str, int] = {}
    loose = _count_images(folder)
    if loose:
        per_folder["."] = loose
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and parse_concept_folder_name(p.name))
    for sub in classes:
        per_folder[sub.name] = _count_images(sub)
    if loose or not classes:
        target = folder
    else:
        target = classes[0] if len(classes) == 1 else None
    return RegImageCount(folder, requested, per_folder, target)
