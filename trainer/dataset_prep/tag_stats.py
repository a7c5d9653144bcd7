"""Tag frequencies of a dataset, counted as sd-scripts' ``ss_tag_frequency``.

Per image folder (keyed by the folder's name, as sd-scripts keys by the
basename of each subset's image_dir): every caption (file, else folder name) is
split on commas, each tag stripped and lower-cased, empty ones dropped, and each
occurrence counted once per image (repeats do not multiply it). Reg folders
count as their own folders, as in sd-scripts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from trainer.data.captions import split_tags

from .caption_edit import list_captions


@dataclass(frozen=True)
class TagFrequencies:
    per_folder: dict[str, dict[str, int]]  # folder name -> tag -> count, most frequent first
    overall: dict[str, int]
    images_per_folder: dict[str, int]
    unreadable: int  # caption files that could not be read (not counted)

    @property
    def images(self) -> int:
        return sum(self.images_per_folder.values())

    def describe(self, top: int = 20) -> str:
        if not self.images:
            return "no images"
        lines = [f"{self.images} image(s) in {len(self.per_folder)} folder(s), {len(self.overall)} distinct tag(s)",
                 f"overall: {_top(self.overall, top)}"]
        lines += [f"{folder} ({self.images_per_folder[folder]} image(s)): {_top(counts, top)}"
                  for folder, counts in self.per_folder.items()]
        if self.unreadable:
            lines.append(f"{self.unreadable} unreadable caption file(s) were not counted")
        return "\n".join(lines)

    @property
    def summary(self) -> str:
        return self.describe()


def _top(counts: dict[str, int], top: int) -> str:
    shown = ", ".join(f"{tag} ({count})" for tag, count in list(counts.items())[:top])
    more = len(counts) - top
    return shown + (f", ... {more} more" if more > 0 else "") if counts else "(no tags)"


def _by_count(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def count_tags(captions) -> dict[str, int]:
    """Tag -> occurrences over the captions, most frequent first (ties by name)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in split_tags(caption):
            tag = tag.lower()
            counts[tag] = counts.get(tag, 0) + 1
    return _by_count(counts)


def tag_frequencies(*roots: str | os.PathLike | None, caption_extension: str = ".txt") -> TagFrequencies:
    """Tag counts over the images of the given datasets (e.g. train_data_dir, reg_data_dir; empty ones skipped)."""
    captions: dict[str, list[str]] = {}
    unreadable = 0
    for root in roots:
        if not root:
            continue
        for entry in list_captions(root, caption_extension).entries:
            unreadable += bool(entry.error)
            if not entry.error:
                captions.setdefault(entry.folder, []).append(entry.text)
    per_folder = {folder: count_tags(texts) for folder, texts in sorted(captions.items())}
    overall: dict[str, int] = {}
    for counts in per_folder.values():
        for tag, count in counts.items():
            overall[tag] = overall.get(tag, 0) + count
    images = {folder: len(texts) for folder, texts in sorted(captions.items())}
    return TagFrequencies(per_folder, _by_count(overall), images, unreadable)
