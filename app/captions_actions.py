"""The caption editor as the Dataset Preparation tab calls it: list, pick, save, bulk-edit, tag counts.

``trainer.dataset_prep`` reads and writes the captions; this module turns its results
into table rows and page text. Plain Python (PIL for the preview image, no gradio).
"""
from __future__ import annotations

from pathlib import Path

from .tab_common import USER_ERRORS, done, problem, text

CAPTION_HEADERS = ["image", "folder", "caption from", "caption"]
TAG_HEADERS = ["tag", "images"]
PREVIEW_SIZE = 768  # longest side of the preview sent to the page
ADD_START, ADD_END, REPLACE, REMOVE = "add at the start", "add at the end", "replace", "remove"
BULK_OPERATIONS = (ADD_START, ADD_END, REPLACE, REMOVE)
SOURCE_TEXT = {"file": "caption file", "folder name": "folder name", "none": "nothing"}


def listing(folder: str, caption_extension: str) -> tuple[str, list[list[str]], list[str]]:
    """(status, table rows, image paths in row order) of the images in ``folder`` and its concept folders."""
    from trainer.dataset_prep import list_captions

    if not text(folder):
        return problem("Type the folder of the images (the Image folder, or one concept folder)."), [], []
    try:
        found = list_captions(text(folder), caption_extension or "")
    except USER_ERRORS as err:
        return problem(str(err)), [], []
    rows = [[e.image.name, e.folder, SOURCE_TEXT.get(e.source, e.source), e.error or e.text] for e in found.entries]
    return done(found.summary), rows, [str(e.image) for e in found.entries]


def pick(images: list[str], row: int, caption_extension: str):
    """(image path, preview image, caption, where the caption comes from) of the table row ``row``."""
    from PIL import Image

    from trainer.dataset_prep import read_caption

    if not 0 <= row < len(images):
        return "", None, "", ""
    entry = read_caption(images[row], caption_extension or "")
    with Image.open(entry.image) as opened:
        preview = opened.convert("RGB")
    preview.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
    return str(entry.image), preview, entry.text, _source_note(entry)


def _source_note(entry) -> str:
    if entry.error:
        return f"{entry.caption_file.name} cannot be read: {entry.error}"
    if entry.source == "file":
        return f"From {entry.caption_file.name}."
    if entry.source == "folder name":
        return (f"No {entry.caption_file.suffix} file: training uses the folder name. "
                f"Saving writes {entry.caption_file.name}.")
    return f"No caption: training uses an empty caption. Saving writes {entry.caption_file.name}."


def save(image: str, caption: str, caption_extension: str) -> str:
    from trainer.dataset_prep import write_caption

    if not text(image):
        return problem("Pick an image in the table first.")
    try:
        entry = write_caption(image, caption or "", caption_extension or "")
    except USER_ERRORS as err:
        return problem(f"Not saved: {err}")
    return done(f"Saved {entry.caption_file.name}: {entry.text or '(empty)'}")


def bulk_edit(folder: str, operation: str, tags: str, replacement: str, caption_extension: str,
              dry_run: bool = False) -> str:
    """Add, replace or remove tags in every caption under ``folder``; ``dry_run`` only says what would change."""
    from trainer.dataset_prep import AT_END, AT_START, add_tags, remove_tags, replace_tag

    if not text(folder):
        return problem("Type the folder of the images first.")
    root, common = text(folder), {"caption_extension": caption_extension or "", "dry_run": dry_run}
    edits = {
        ADD_START: lambda: add_tags(root, tags or "", at=AT_START, **common),
        ADD_END: lambda: add_tags(root, tags or "", at=AT_END, **common),
        REPLACE: lambda: replace_tag(root, tags or "", replacement or "", **common),
        REMOVE: lambda: remove_tags(root, tags or "", **common),
    }
    try:
        result = edits[operation]()
    except USER_ERRORS as err:
        return problem(str(err))
    names = ", ".join(Path(p).name for p in result.changed[:5]) + (" ..." if len(result.changed) > 5 else "")
    return done(result.summary + (f" ({names})" if result.changed else ""), list(result.failed))


def tag_table(folder: str, caption_extension: str) -> tuple[list[str], list[list]]:
    """(headers, rows) of tag counts: overall, then one column per concept folder."""
    from trainer.dataset_prep import tag_frequencies

    if not text(folder):
        return TAG_HEADERS, []
    try:
        counts = tag_frequencies(text(folder), caption_extension=caption_extension or "")
    except USER_ERRORS:
        return TAG_HEADERS, []  # the listing already says what is wrong with the folder
    folders = list(counts.per_folder)
    headers = TAG_HEADERS + (folders if len(folders) > 1 else [])
    rows = [[tag, total] + ([counts.per_folder[f].get(tag, 0) for f in folders] if len(folders) > 1 else [])
            for tag, total in counts.overall.items()]
    return headers, rows
