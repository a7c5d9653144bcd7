"""The masked-loss check: with ``masked_loss`` every training image needs a mask, its alpha channel.

sd-scripts weights the loss by the alpha channel (its ``alpha_mask``) or by a conditioning image; Nekoya reads
the alpha channel. An image without one would train as a whole image while the run means to train a masked
part, so the check refuses the run and names those images. Regularisation images without alpha count whole
(as sd-scripts reads them: opaque). Only the image headers are read.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem

NAMED = 5  # images named in the message; the rest are counted


def image_has_alpha(path: Path | str) -> bool | None:
    """Whether the image has an alpha channel (from its header), None when it cannot be opened."""
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
    entries = getattr(plan, "entries", ())
    missing = images_without_alpha(e.item.path for e in entries if not e.item.is_reg)
    if missing:
        named = ", ".join(str(p) for p in missing[:NAMED])
        more = f" and {len(missing) - NAMED} more" if len(missing) > NAMED else ""
        yield Problem("error", "masked_loss",
                      f"masked_loss weights the loss by each image's alpha channel, but {len(missing)} training "
                      f"image{'s have' if len(missing) > 1 else ' has'} none: {named}{more}",
                      fix="save them as PNG/WebP with transparency where the loss should not count, "
                          "or turn masked_loss off", file=str(missing[0]))
        return
    reg = images_without_alpha(e.item.path for e in entries if e.item.is_reg)
    if reg:
        yield Problem("note", "masked_loss", f"{len(reg)} regularisation image{'s' if len(reg) > 1 else ''} "
                      "without alpha count whole in the masked loss")
