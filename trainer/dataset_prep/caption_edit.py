"""Caption editor backend: list a dataset's images with their captions, read and write one caption.

A "dataset" here is any of: the Image folder (parent of ``<repeats>_<name>``
folders), one concept folder, or a flat folder of images not yet prepared.
Each image's caption is what training would use: its caption file when there is
one, else the concept folder's name (sd-scripts' fallback), else nothing.
Captions are written atomically; images are never touched.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trainer.data.folders import (CaptionReadError, is_image_file, normalise_caption_extension,
                                  parse_concept_folder_name, read_caption_file)
from trainer.safety import atomic_write_text

from .layout import DatasetPrepError

SOURCE_FILE, SOURCE_FOLDER_NAME, SOURCE_NONE = "file", "folder name", "none"


@dataclass(frozen=True)
class CaptionEntry:
    image: Path
    caption_file: Path  # where the caption is (or would be) stored
    text: str  # the caption training uses
    source: str  # SOURCE_FILE, SOURCE_FOLDER_NAME or SOURCE_NONE
    folder: str  # the image's folder name, e.g. "40_sks girl"
    error: str = ""  # the caption file exists but cannot be read (then text is "")

    @property
    def from_file(self) -> bool:
        return self.source == SOURCE_FILE


@dataclass(frozen=True)
class CaptionListing:
    root: Path
    caption_extension: str
    entries: tuple[CaptionEntry, ...]
    ignored_folders: tuple[str, ...]  # subfolders that are not <repeats>_<name> folders

    @property
    def summary(self) -> str:
        if not self.entries:
            text = f"no images in {self.root} or in its <repeats>_<name> folders"
            if self.ignored_folders:
                text += f" (subfolders {', '.join(self.ignored_folders[:5])} are not <repeats>_<name> folders)"
            return text
        counts = {source: sum(1 for e in self.entries if e.source == source)
                  for source in (SOURCE_FILE, SOURCE_FOLDER_NAME, SOURCE_NONE)}
        folders = len({e.folder for e in self.entries})
        text = (f"{len(self.entries)} image(s) in {folders} folder(s): {counts[SOURCE_FILE]} captioned by "
                f"{self.caption_extension or 'caption'} file, {counts[SOURCE_FOLDER_NAME]} by the folder name")
        if counts[SOURCE_NONE]:
            text += f", {counts[SOURCE_NONE]} with no caption at all"
        unreadable = sum(1 for e in self.entries if e.error)
        if unreadable:
            text += f"; {unreadable} caption file(s) cannot be read"
        return text


def required_caption_extension(caption_extension: str) -> str:
    extension = normalise_caption_extension(caption_extension)
    if not extension:
        raise DatasetPrepError("the caption extension is empty; set it (e.g. .txt) to read or write caption files")
    return extension


def caption_path(image: str | os.PathLike, caption_extension: str) -> Path:
    image = Path(image)
    return image.with_name(image.stem + required_caption_extension(caption_extension))


def fallback_caption(image: Path) -> str:
    """The caption sd-scripts uses without a caption file: the ``<name>`` of ``<repeats>_<name>``."""
    parsed = parse_concept_folder_name(image.parent.name)
    return parsed[1] if parsed else ""


def read_caption(image: str | os.PathLike, caption_extension: str = ".txt") -> CaptionEntry:
    image = Path(image)
    path = caption_path(image, caption_extension)
    if path.is_file():
        try:
            return CaptionEntry(image, path, read_caption_file(path), SOURCE_FILE, image.parent.name)
        except CaptionReadError as exc:
            return CaptionEntry(image, path, "", SOURCE_FILE, image.parent.name, error=str(exc))
    fallback = fallback_caption(image)
    return CaptionEntry(image, path, fallback, SOURCE_FOLDER_NAME if fallback else SOURCE_NONE, image.parent.name)


def clean_caption(text: str) -> str:
    """One line: sd-scripts reads only a caption file's first line, so line breaks become ", "."""
    lines = [line.strip() for line in (text or "").splitlines()]
    return ", ".join(line for line in lines if line)


def write_caption(image: str | os.PathLike, text: str, caption_extension: str = ".txt") -> CaptionEntry:
    """Save ``text`` as the image's caption file (atomically) and return the entry as read back."""
    image = Path(image)
    if not (image.is_file() and is_image_file(image)):
        raise DatasetPrepError(f"{image} is not an image file; no caption was written")
    atomic_write_text(caption_path(image, caption_extension), clean_caption(text))
    return read_caption(image, caption_extension)


def list_captions(root: str | os.PathLike, caption_extension: str = ".txt") -> CaptionListing:
    """Images directly in ``root`` and in its ``<repeats>_<name>`` subfolders, sorted, with their captions."""
    root_path = Path(root).expanduser() if root else None
    if root_path is None or not root_path.is_dir():
        raise DatasetPrepError(f"the dataset folder does not exist or is not a folder: {root}")
    extension = required_caption_extension(caption_extension)
    subfolders = sorted(p for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    concept_dirs = [p for p in subfolders if parse_concept_folder_name(p.name)]
    ignored = tuple(p.name for p in subfolders if not parse_concept_folder_name(p.name))
    entries = tuple(read_caption(image, extension) for folder in [root_path, *concept_dirs]
                    for image in _images_in(folder))
    return CaptionListing(root_path, extension, entries, ignored)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))
