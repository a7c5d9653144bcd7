"""Copy a flat folder of images (and their caption files) into a concept folder, staged.

Files are first copied into a hidden temp folder next to the target and only then
renamed into place, so an interrupted copy never leaves a half-filled concept
folder that training would pick up. Sources are only ever read.
"""
from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainer.data.folders import IMAGE_EXTENSIONS, is_image_file, parse_concept_folder_name

from .layout import DatasetPrepError

STAGING_PREFIX = ".nekoya-staging-"
# Caption extensions people use; files with another one than the chosen are pointed out, not copied.
KNOWN_CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass(frozen=True)
class SourceImages:
    """The images directly inside a source folder, and the caption files that go with them."""

    folder: Path
    images: tuple[Path, ...]
    captions: tuple[Path, ...]
    uncaptioned: int  # images without a caption file of the chosen extension
    other_captions: int  # images with a caption file of another known extension only

    @property
    def files(self) -> tuple[Path, ...]:
        return self.images + self.captions


@dataclass(frozen=True)
class FolderDiff:
    """A source compared with an existing concept folder (only images and caption files count)."""

    to_copy: tuple[Path, ...]  # source files not yet in the destination
    different: tuple[str, ...]  # names in both whose bytes differ
    only_in_destination: tuple[str, ...]
    same: int

    @property
    def identical(self) -> bool:
        return not (self.to_copy or self.different or self.only_in_destination)


def _visible_files(folder: Path) -> list[Path]:
    # dot files are OS litter (.DS_Store, macOS "._x.png" forks), never dataset content
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def collect_source(label: str, folder: Path, caption_extension: str) -> SourceImages:
    """Images directly in ``folder`` plus each one's ``<stem><caption_extension>`` file when present."""
    files = _visible_files(folder)
    names = {p.name for p in files}
    images = [p for p in files if is_image_file(p)]
    if not images:
        raise DatasetPrepError(_no_images_message(label, folder))
    captions: dict[str, Path] = {}
    uncaptioned = other = 0
    for image in images:
        caption_name = image.stem + caption_extension if caption_extension else None
        if caption_name and caption_name in names:
            captions[caption_name] = folder / caption_name
            continue
        uncaptioned += 1
        other += any(image.stem + ext in names for ext in KNOWN_CAPTION_EXTENSIONS if ext != caption_extension)
    return SourceImages(folder, tuple(images), tuple(captions[n] for n in sorted(captions)), uncaptioned, other)


def _no_images_message(label: str, folder: Path) -> str:
    message = f"no images ({', '.join(IMAGE_EXTENSIONS)}) lie directly in the {label} folder {folder}"
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if any(parse_concept_folder_name(name) for name in subfolders):
        return (message + f"; it holds <repeats>_<name> folders ({', '.join(subfolders[:3])}), so it is already "
                "prepared: use it as the Image folder directly, or choose the folder that holds the images")
    if subfolders:
        return message + f"; choose the subfolder that holds them ({', '.join(subfolders[:3])})"
    return message


def compare_with_destination(source: SourceImages, target: Path, caption_extension: str) -> FolderDiff:
    if not target.is_dir():
        return FolderDiff(source.files, (), (), 0)
    existing = {p.name: p for p in _visible_files(target)
                if is_image_file(p) or (caption_extension and p.name.endswith(caption_extension))}
    to_copy, different, same = [], [], 0
    for path in source.files:
        there = existing.get(path.name)
        if there is None:
            to_copy.append(path)
        elif filecmp.cmp(path, there, shallow=False):
            same += 1
        else:
            different.append(path.name)
    source_names = {p.name for p in source.files}
    extra = tuple(sorted(name for name in existing if name not in source_names))
    return FolderDiff(tuple(to_copy), tuple(different), extra, same)


def remove_stale_staging(parent: Path) -> int:
    """Delete staging folders an interrupted earlier run left behind (only ours, by their prefix)."""
    if not parent.is_dir():
        return 0
    stale = [p for p in parent.iterdir() if p.is_dir() and p.name.startswith(STAGING_PREFIX)]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return len(stale)


class StagedCopy:
    """Stage every concept folder first, then move them all into place.

    ``discard`` (also on any error while staging) removes what was staged and
    leaves the destination as it was.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path, bool]] = []  # (staging folder, target, merge into existing)

    def stage(self, files: tuple[Path, ...], target: Path, *, merge: bool) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-", dir=target.parent))
        self._staged.append((staging, target, merge))
        for path in files:
            shutil.copy2(path, staging / path.name)

    def commit(self) -> None:
        for staging, target, merge in self._staged:
            if merge and target.is_dir():
                _move_files_into(staging, target)
            else:
                if target.exists():
                    raise DatasetPrepError(f"{target} appeared while copying; nothing was moved into it")
                os.rename(staging, target)
        self._staged.clear()

    def discard(self) -> None:
        for staging, _target, _merge in self._staged:
            shutil.rmtree(staging, ignore_errors=True)
        self._staged.clear()


def _move_files_into(staging: Path, target: Path) -> None:
    # Each rename is atomic, so every file in the target is whole even if this stops halfway.
    for path in sorted(staging.iterdir()):
        destination = target / path.name
        if not destination.exists():  # never replace a file in the existing folder
            os.rename(path, destination)
    shutil.rmtree(staging, ignore_errors=True)
