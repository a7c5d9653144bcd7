"""Bulk caption edits kohya users make by hand: add a tag to all, replace a tag, remove tags.

Captions are treated as comma-separated tags (as sd-scripts' shuffle and tag
frequency do), matched case-insensitively and ignoring spaces around them. A
caption file is rewritten only when its tags change (then joined with ", "); an
image captioned by its folder name gets a caption file when an edit changes it.
Unreadable caption files are left alone and reported.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from trainer.data.captions import split_tags
from trainer.safety import atomic_write_text

from .caption_edit import SOURCE_FILE, list_captions
from .layout import DatasetPrepError

AT_START, AT_END = "start", "end"


@dataclass(frozen=True)
class BulkEditResult:
    operation: str
    changed: tuple[Path, ...]  # caption files written (in a dry run: that would be written)
    created: int  # of those, files that did not exist before
    unchanged: int
    failed: tuple[str, ...]  # "<caption file>: <why>" for unreadable files left as they are
    dry_run: bool = False

    @property
    def summary(self) -> str:
        verb = "would change" if self.dry_run else "changed"
        text = f"{self.operation}: {verb} {len(self.changed)} caption(s)"
        if self.created:
            text += f" ({self.created} new caption file(s) for images that had none)"
        text += f", {self.unchanged} unchanged"
        if self.failed:
            text += f"; {len(self.failed)} unreadable caption file(s) skipped: " + "; ".join(self.failed[:3])
        return text


def parse_tags(tags: str | Iterable[str]) -> list[str]:
    """``"a, b"`` or ``["a", "b, c"]`` -> ``["a", "b", "c"]``."""
    items = [tags] if isinstance(tags, str) else list(tags)
    return [tag for item in items for tag in split_tags(item)]


def _key(tag: str) -> str:
    return tag.lower()


def add_tags(root: str | os.PathLike, tags: str | Iterable[str], *, at: str = AT_START,
             caption_extension: str = ".txt", dry_run: bool = False) -> BulkEditResult:
    """Add tags at the start (e.g. a trigger word, for keep_tokens) or end of every caption that lacks them."""
    new = parse_tags(tags)
    if not new:
        raise DatasetPrepError("no tag to add")
    if at not in (AT_START, AT_END):
        raise DatasetPrepError(f"tags go at '{AT_START}' or '{AT_END}', not {at!r}")

    def rewrite(current: list[str]) -> list[str]:
        present = {_key(t) for t in current}
        missing = []
        for tag in new:
            if _key(tag) not in present:
                missing.append(tag)
                present.add(_key(tag))
        return missing + current if at == AT_START else current + missing

    return _apply(root, caption_extension, rewrite, f"add {', '.join(new)} at the {at}", dry_run)


def replace_tag(root: str | os.PathLike, old: str, new: str, *, caption_extension: str = ".txt",
                dry_run: bool = False) -> BulkEditResult:
    """Replace the tag ``old`` by ``new`` (one or more tags) where it occurs, without duplicating a tag."""
    old_tag, new_tags = old.strip(), parse_tags(new)
    if not old_tag or not new_tags:
        raise DatasetPrepError("give the tag to find and the tag to put instead (to delete a tag, use remove)")

    def rewrite(current: list[str]) -> list[str]:
        if _key(old_tag) not in {_key(t) for t in current}:
            return current
        kept = {_key(t) for t in current if _key(t) != _key(old_tag)}
        result: list[str] = []
        for tag in current:
            if _key(tag) != _key(old_tag):
                result.append(tag)
                continue
            for replacement in new_tags:
                if _key(replacement) not in kept and _key(replacement) not in {_key(t) for t in result}:
                    result.append(replacement)
        return result

    return _apply(root, caption_extension, rewrite, f"replace {old_tag} with {', '.join(new_tags)}", dry_run)


def remove_tags(root: str | os.PathLike, tags: str | Iterable[str], *, caption_extension: str = ".txt",
                dry_run: bool = False) -> BulkEditResult:
    """Remove every occurrence of the given tags."""
    unwanted = {_key(t) for t in parse_tags(tags)}
    if not unwanted:
        raise DatasetPrepError("no tag to remove")

    def rewrite(current: list[str]) -> list[str]:
        return [t for t in current if _key(t) not in unwanted]

    return _apply(root, caption_extension, rewrite, f"remove {', '.join(sorted(unwanted))}", dry_run)


def _apply(root, caption_extension: str, rewrite: Callable[[list[str]], list[str]], operation: str,
           dry_run: bool) -> BulkEditResult:
    listing = list_captions(root, caption_extension)
    changed: list[Path] = []
    failed: list[str] = []
    created = unchanged = 0
    for entry in listing.entries:
        if entry.error:
            failed.append(f"{entry.caption_file}: {entry.error}")
            continue
        tags = split_tags(entry.text)
        new_tags = rewrite(tags)
        if new_tags == tags:
            unchanged += 1
            continue
        if not dry_run:
            atomic_write_text(entry.caption_file, ", ".join(new_tags))
        changed.append(entry.caption_file)
        created += entry.source != SOURCE_FILE
    return BulkEditResult(operation, tuple(changed), created, unchanged, tuple(failed), dry_run)
