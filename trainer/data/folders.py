"""Scan kohya-style dataset folders: ``<train_data_dir>/<repeats>_<class tokens>/image.png``.

Only image headers are read (size and EXIF orientation), so a scan of a few
hundred images takes milliseconds and can back a live step plan in the GUI.
Everything left out is reported with a reason instead of being dropped quietly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from trainer.problems import NekoyaError

if TYPE_CHECKING:
    from trainer.data.dataset_config import DatasetToml, SubsetSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# EXIF orientations 5..8 rotate by 90/270 degrees: the displayed image has width and height swapped.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class ImageItem:
    """One image file with what the trainer needs to know before decoding it."""

    path: Path
    width: int  # as displayed, i.e. after EXIF orientation
    height: int
    caption: str
    repeats: int
    is_reg: bool
    folder: str  # concept folder name, e.g. "10_sks dog"
    caption_from_file: bool
    # from a dataset config file: the subset whose settings (captions, flip, colour, crop, batch) it trains with
    subset: "SubsetSpec | None" = None

    @property
    def dataset(self) -> int:
        """The index of its dataset in the dataset config (0 for folder-based runs: one dataset)."""
        return self.subset.dataset_index if self.subset is not None else 0


@dataclass(frozen=True)
class Concept:
    """One ``<repeats>_<name>`` folder."""

    folder: Path
    name: str  # class tokens: the fallback caption
    repeats: int
    is_reg: bool
    images: tuple[ImageItem, ...]
    captions_found: int  # images that have a caption file
    subset: "SubsetSpec | None" = None  # from a dataset config file

    @property
    def samples(self) -> int:
        return self.repeats * len(self.images)


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str
    fix: str = ""  # what would bring it back in, when a setting can


@dataclass(frozen=True)
class ScanResult:
    root: Path
    is_reg: bool
    concepts: tuple[Concept, ...]
    skipped: tuple[Skipped, ...]
    problems: tuple[str, ...]  # about the root itself: missing, empty, images at the top level
    warnings: tuple[str, ...]  # non-fatal notes: missing captions, empty caption files

    @property
    def images(self) -> list[ImageItem]:
        return [item for concept in self.concepts for item in concept.images]

    @property
    def samples(self) -> int:
        return sum(concept.samples for concept in self.concepts)


class CaptionReadError(NekoyaError, ValueError):
    """A caption file exists but cannot be used (not UTF-8)."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def parse_concept_folder_name(name: str) -> tuple[int, str] | None:
    """``"10_sks dog"`` -> ``(10, "sks dog")``, as sd-scripts: split on ``_``, int of the first part.

    Returns None when the name has no integer prefix.
    """
    head, _, rest = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, rest


def normalise_caption_extension(extension: str) -> str:
    extension = (extension or "").strip()
    if extension and not extension.startswith("."):
        extension = "." + extension
    return extension


def read_caption_file(path: Path) -> str:
    """First line of a UTF-8 caption file, stripped. A BOM (Windows Notepad) is removed."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionReadError(f"caption file is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    lines = text.splitlines()
    return lines[0].strip() if lines else ""


class _HeaderCache:
    """Image sizes keyed by (path, mtime, file size): a live GUI plan re-scans without re-opening files."""

    def __init__(self, limit: int = 100_000) -> None:
        self._sizes: dict[tuple[str, int, int], tuple[int, int]] = {}
        self._limit = limit

    def size(self, path: Path) -> tuple[int, int]:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        cached = self._sizes.get(key)
        if cached is None:
            cached = read_image_size(path)
            if len(self._sizes) >= self._limit:
                self._sizes.clear()
            self._sizes[key] = cached
        return cached


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, from the header only; EXIF rotation swaps the sides."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height


_header_cache = _HeaderCache()


def scan_dataset_dir(root: str | os.PathLike | None, *, is_reg: bool, caption_extension: str) -> ScanResult:
    """Scan a parent folder of ``<repeats>_<name>`` concept folders, in sorted order."""
    root_path = Path(root) if root else Path()
    kind = "reg_data_dir" if is_reg else "train_data_dir"
    if not root or not root_path.is_dir():
        problem = f"{kind} is not set" if not root else f"{kind} does not exist or is not a folder: {root_path}"
        return ScanResult(root_path, is_reg, (), (), (problem,), ())

    extension = normalise_caption_extension(caption_extension)
    concepts: list[Concept] = []
    skipped: list[Skipped] = []
    warnings: list[str] = []
    entries = sorted(root_path.iterdir(), key=lambda p: p.name)
    for entry in entries:
        if not entry.is_dir():
            continue
        parsed = parse_concept_folder_name(entry.name)
        if parsed is None:
            skipped.append(Skipped(entry, "folder name does not start with '<repeats>_' (e.g. '10_sks dog')"))
            continue
        repeats, name = parsed
        if repeats < 1:
            skipped.append(Skipped(entry, f"repeats must be at least 1 (got {repeats})"))
            continue
        concept = _scan_concept(entry, name, repeats, is_reg, extension, skipped, warnings)
        if concept.images:
            concepts.append(concept)
        else:
            skipped.append(Skipped(entry, "no usable images (" + ", ".join(IMAGE_EXTENSIONS) + ")"))

    problems = _root_problems(root_path, kind, entries, concepts)
    return ScanResult(root_path, is_reg, tuple(concepts), tuple(skipped), problems, tuple(warnings))


def _root_problems(root: Path, kind: str, entries: list[Path], concepts: list[Concept]) -> tuple[str, ...]:
    loose_images = sum(1 for p in entries if p.is_file() and is_image_file(p))
    problems = []
    if loose_images:
        problems.append(
            f"{loose_images} image(s) lie directly in {kind} {root}; they are not used. "
            f"{kind} must be the parent of folders named '<repeats>_<name>', e.g. {root / '10_subject'}"
        )
    if not concepts:
        problems.append(f"no images found in any '<repeats>_<name>' folder of {kind} {root}")
    return tuple(problems)


def scan_dataset_config(config: "DatasetToml") -> tuple[ScanResult, ScanResult | None]:
    """The images of a dataset config's subsets: (train subsets, reg subsets or None when there are none).

    Each subset is one Concept (its image_dir, num_repeats, class_tokens) whose images carry the subset.
    A subset whose image_dir is missing is an error; so is a file without any training image.
    """
    results = []
    for is_reg in (False, True):
        subsets = [subset for subset in config.subsets if subset.is_reg == is_reg]
        concepts: list[Concept] = []
        skipped: list[Skipped] = []
        warnings: list[str] = []
        problems: list[str] = []
        for subset in subsets:
            problem = subset_dir_problem(config, subset)
            if problem:
                problems.append(problem)
                continue
            concept = _scan_concept(subset.image_dir, subset.class_tokens or "", subset.num_repeats, is_reg,
                                    subset.caption_extension, skipped, warnings, subset)
            if concept.images:
                concepts.append(concept)
            else:
                warnings.append(f"dataset_config [{subset.table}]: no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                                f"image_dir {subset.image_dir}")
        if not is_reg and not concepts and not problems:
            problems.append(f"dataset_config {config.path}: no training images in any subset"
                            + ("" if subsets else " (every subset has is_reg = true)"))
        results.append(ScanResult(config.path, is_reg, tuple(concepts), tuple(skipped), tuple(problems), tuple(warnings)))
    train, reg = results
    return train, (reg if any(subset.is_reg for subset in config.subsets) else None)


def scan_settings_dataset_config(settings: Any) -> tuple[ScanResult, ScanResult | None]:
    """``scan_dataset_config`` of the file the settings' ``dataset_config`` names; a file that cannot be used
    gives a train scan with its error as the one problem."""
    from trainer.data.dataset_config import DatasetConfigError, dataset_config_path, load_dataset_config

    try:
        config = load_dataset_config(settings)
    except DatasetConfigError as exc:
        return ScanResult(Path(dataset_config_path(settings)), False, (), (), (str(exc),), ()), None
    return scan_dataset_config(config)


def subset_dir_problem(config: "DatasetToml", subset: "SubsetSpec") -> str:
    """Why a subset's image_dir cannot be scanned ("" when it can)."""
    where = f"dataset_config {config.path}: [{subset.table}] image_dir"
    if not subset.image_dir.exists():
        relative = "" if subset.image_dir.is_absolute() else \
            f" (a relative path is read from the current folder {Path.cwd()}, as sd-scripts reads it)"
        return f"{where}: {subset.image_dir} does not exist{relative}"
    if not subset.image_dir.is_dir():
        return f"{where}: {subset.image_dir} is a file, not a folder"
    return ""


def _scan_concept(
    folder: Path,
    name: str,
    repeats: int,
    is_reg: bool,
    caption_extension: str,
    skipped: list[Skipped],
    warnings: list[str],
    subset: Any = None,
) -> Concept:
    images: list[ImageItem] = []
    captions_found = 0
    empty_captions = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p)):
        try:
            width, height = _header_cache.size(path)
        except Image.DecompressionBombError:
            from trainer.data.images import too_large_reason

            skipped.append(Skipped(path, too_large_reason(path)))
            continue
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            skipped.append(Skipped(path, f"cannot read image header: {exc}"))
            continue
        caption_path = path.with_name(path.stem + caption_extension) if caption_extension else None
        caption_from_file = caption_path is not None and caption_path.is_file()
        if caption_from_file:
            try:
                caption = read_caption_file(caption_path)
            except CaptionReadError as exc:
                skipped.append(Skipped(caption_path, str(exc)))
                continue
            captions_found += 1
            empty_captions += caption == ""
        else:
            caption = name
        images.append(ImageItem(path, width, height, caption, repeats, is_reg, folder.name, caption_from_file, subset))

    missing = len(images) - captions_found
    if images and missing:
        fallback = (f"the folder name '{name}'" if subset is None else f"class_tokens '{name}'") if name \
            else "an empty caption"
        warnings.append(
            f"{folder.name}: {missing} of {len(images)} images have no {caption_extension or 'caption'} file; using {fallback}"
        )
    if empty_captions:
        warnings.append(f"{folder.name}: {empty_captions} caption file(s) are empty")
    return Concept(folder, name, repeats, is_reg, tuple(images), captions_found, subset)
