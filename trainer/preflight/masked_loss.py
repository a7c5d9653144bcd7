"""The masked-loss check: with ``masked_loss`` every training image needs a mask: its alpha channel, or the image
of the same name in its subset's ``conditioning_data_dir`` (a dataset config file), as sd-scripts reads them.

An image without one would train as a whole image while the run means to train a masked
part, so the check refuses the run and names those images. Regularisation images without alpha count whole
(as sd-scripts reads them: opaque). Only the image headers are read.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from trainer.data.images import mask_file
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem

NAMED = 5  # images named in the message; the rest are counted


_SEEN: dict[tuple[str, int, int], bool | None] = {}  # (path, mtime, size) -> the answer: the GUI checks often


def image_has_alpha(path: Path | str) -> bool | None:
    """Whether the image has an alpha channel (from its header), None when it cannot be opened."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _SEEN:
        _SEEN[key] = _read_has_alpha(path)
    return _SEEN[key]


def _read_has_alpha(path: Path | str) -> bool | None:
    try:
        with Image.open(path) as image:
            return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                image.mode == "P" and "transparency" in image.info)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def images_without_alpha(paths) -> list[Path]:
    return [Path(p) for p in dict.fromkeys(paths) if image_has_alpha(p) is False]


@preflight_check("dataset.masked_loss")
def check_masked_loss(ctx: CheckContext):
    if not getattr(ctx.settings, "masked_loss", False):
        return
    plan = ctx.plan
    if plan is None:  # the dataset checks report why
        return
    entries = list({e.item.path: e for e in getattr(plan, "entries", ())}.values())
    folders = {getattr(e.item.subset, "conditioning_data_dir", None) for e in entries} - {None}
    for folder in sorted(folders):
        if not folder.is_dir():
            yield Problem("error", "dataset_config", f"masked_loss: the conditioning_data_dir {folder} (the loss "
                          "masks) is not a folder", fix="set it to the folder of the masks", file=str(folder))
    in_folders = [e for e in entries if getattr(e.item.subset, "conditioning_data_dir", None) in folders]
    no_mask = [e.item.path for e in in_folders if (folder := e.item.subset.conditioning_data_dir).is_dir()
               and mask_file(e.item.path, folder) is None]
    if no_mask:
        yield Problem("error", "dataset_config", f"masked_loss: {_count(no_mask)} no mask of the same name in "
                      f"its subset's conditioning_data_dir: {_names(no_mask)}",
                      fix="add a mask image (white: counts, black: does not) named like each image",
                      file=str(no_mask[0]))
    by_alpha = [e for e in entries if e not in in_folders]
    missing = images_without_alpha(e.item.path for e in by_alpha if not e.item.is_reg)
    if missing:
        yield Problem("error", "masked_loss",
                      f"masked_loss weights the loss by each image's alpha channel, but {_count(missing)} none: "
                      f"{_names(missing)}",
                      fix="save them as PNG/WebP with transparency where the loss should not count, give their "
                          "subset a conditioning_data_dir of masks (dataset config), or turn masked_loss off",
                      file=str(missing[0]))
        return
    reg = images_without_alpha(e.item.path for e in by_alpha if e.item.is_reg)
    if reg:
        yield Problem("note", "masked_loss", f"{len(reg)} regularisation image{'s' if len(reg) > 1 else ''} "
                      "without alpha count whole in the masked loss")


def _count(paths) -> str:
    return f"{len(paths)} training image{'s have' if len(paths) > 1 else ' has'}"


def _names(paths) -> str:
    named = ", ".join(str(p) for p in paths[:NAMED])
    return named + (f" and {len(paths) - NAMED} more" if len(paths) > NAMED else "")
