"""Image loading and augmentation with PIL + numpy (no torchvision, no OpenCV).

Pipeline per sample, as sd-scripts' ``trim_and_resize_if_required``: load RGB,
resize to the bucket choice's ``resized`` size, crop to the bucket (centred or
random), then optional flip and colour augmentation, then a float tensor in [-1, 1].

Differences from sd-scripts, on purpose:
* EXIF orientation is applied (phone photos are trained upright); the folder scan
  swaps the header size to match.
* Transparent images are composited on white instead of keeping whatever colour
  the fully transparent pixels happen to hold (often black).
* Colour augmentation works in real RGB HSV and applies gamma to [0, 1] values;
  sd-scripts treats RGB as BGR for the hue shift and raises 0..255 values to the
  gamma, which saturates bright pixels.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from trainer.data.buckets import BucketChoice, Size, crop_offsets
from trainer.problems import NekoyaError

COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT = 8.0  # on OpenCV's 0..180 hue scale, as sd-scripts
GAMMA_RANGE = (0.95, 1.05)
# What PIL, and so kohya's sd-scripts, refuses to open as a possible decompression bomb (about 179 MP, e.g.
# 13000x13000); PIL only warns between half this and this, and such photos train (slowly) in kohya too.
MAX_IMAGE_PIXELS = 2 * 89_478_485


class BadImageError(NekoyaError):
    """An image that cannot be decoded or used; carries the path so it can be reported by name."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # uint8, (height, width, 3), exactly the bucket size
    original_size: Size  # (width, height) of the loaded image, before resizing
    crop_left_top: Size  # (left, top) of the crop in the resized image, after any flip
    flipped: bool


def load_rgb(path: Path | str) -> Image.Image:
    """Decode an image as RGB, upright, with transparency flattened onto white."""
    image = _decode(path)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def load_alpha(path: Path | str) -> Image.Image | None:
    """The image's alpha channel (mode ``L``, upright), or None when it has none."""
    image = _decode(path)
    return image.convert("RGBA").getchannel("A") if has_alpha(image) else None


MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def mask_file(image_path: Path | str, folder: Path | str) -> Path | None:
    """The mask of an image in a mask folder (a subset's ``conditioning_data_dir``): the image file there with the
    same name (stem), as sd-scripts pairs conditioning images; None when there is none."""
    stem = Path(image_path).stem
    for suffix in MASK_EXTENSIONS:
        for candidate in (Path(folder) / f"{stem}{suffix}", Path(folder) / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def prepare_mask(path: Path | str, choice: BucketChoice, *, flip: bool, crop_left_top: Size,
                 mask_path: Path | str | None = None) -> np.ndarray:
    """The loss mask of one prepared sample, as sd-scripts' ``alpha_mask``: the alpha channel in [0, 1], resized,
    flipped and cropped like the image (``crop_left_top`` as the image's PreparedImage or cached latents report
    it, after any flip); all ones for an image without alpha (sd-scripts reads it as opaque). With ``mask_path``
    (a conditioning image) the mask is that image's red channel, as sd-scripts' ``apply_masked_loss`` reads it.
    float32, (height, width) of the bucket."""
    alpha = _decode(mask_path).convert("RGB").getchannel("R") if mask_path is not None else load_alpha(path)
    width, height = choice.bucket
    if alpha is None:
        return np.ones((height, width), dtype=np.float32)
    alpha = resize(alpha, choice.resized)
    if flip:
        alpha = ImageOps.mirror(alpha)
    left, top = crop_left_top
    alpha = alpha.crop((left, top, left + width, top + height))
    return np.asarray(alpha, dtype=np.float32) / 255.0


def _decode(path: Path | str) -> Image.Image:
    """Decode an image, upright (EXIF orientation applied)."""
    try:
        with warnings.catch_warnings(), Image.open(path) as opened:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # under MAX_IMAGE_PIXELS: allowed
            image = ImageOps.exif_transpose(opened)
            image.load()
    except Image.DecompressionBombError as exc:
        raise BadImageError(path, too_large_reason(path)) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImageError(path, f"cannot decode image: {exc}") from exc
    return image


def too_large_reason(path: Path | str) -> str:
    """Why an image over MAX_IMAGE_PIXELS is not read, with its size from the header."""
    size = _unchecked_header_size(Path(path))
    found = f"{size[0]}×{size[1]} pixels ({size[0] * size[1] / 1e6:.0f} MP)" if size else "too large"
    return (f"{found}; images over {MAX_IMAGE_PIXELS / 1e6:.0f} MP are not read (a guard against decompression "
            "bombs): resize it")


def _unchecked_header_size(path: Path) -> tuple[int, int] | None:
    """The size in the header of an image Image.open refuses as too large: the format plugins read headers
    without that check (nothing is decoded)."""
    Image.init()  # the plugins register their openers
    try:
        with open(path, "rb") as fp:
            prefix = fp.read(16)
            for factory, accept in list(Image.OPEN.values()):
                if accept is not None and accept(prefix) is not True:
                    continue
                try:
                    fp.seek(0)
                    return factory(fp, str(path)).size
                except Exception:  # not this format
                    continue
    except OSError:
        pass
    return None


def resize(image: Image.Image, size: Size) -> Image.Image:
    """Area averaging (like OpenCV INTER_AREA) when shrinking both sides, else Lanczos, as sd-scripts."""
    if image.size == tuple(size):
        return image
    shrinking = size[0] < image.width and size[1] < image.height
    return image.resize(size, Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)


def prepare_image(
    path: Path | str,
    choice: BucketChoice,
    *,
    flip: bool = False,
    crop_rng: random.Random | None = None,
    color_rng: random.Random | None = None,
) -> PreparedImage:
    """Load, resize, crop to the bucket, flip and colour-augment one image.

    ``crop_rng`` given means a random crop, else centred; ``color_rng`` given turns on colour augmentation.
    """
    image = load_rgb(path)
    original_size = image.size
    image = resize(image, choice.resized)
    left, top = crop_offsets(choice.resized, choice.bucket, crop_rng)
    image = image.crop((left, top, left + choice.bucket[0], top + choice.bucket[1]))
    pixels = np.asarray(image, dtype=np.uint8)
    if flip:
        pixels = pixels[:, ::-1]
        left = choice.resized[0] - left - choice.bucket[0]  # the crop seen from the mirrored side
    if color_rng is not None:
        pixels = color_augment(pixels, color_rng)
    return PreparedImage(np.ascontiguousarray(pixels), original_size, (left, top), flip)


def color_augment(pixels: np.ndarray, rng: random.Random) -> np.ndarray:
    """With probability 0.33: a hue shift of U(-8, 8) (of 180) or a gamma of U(0.95, 1.05), half each."""
    if rng.random() > COLOR_AUG_PROBABILITY:
        return pixels
    if rng.random() > 0.5:
        return shift_hue(pixels, rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT))
    return apply_gamma(pixels, rng.uniform(*GAMMA_RANGE))


def shift_hue(pixels: np.ndarray, shift_of_180: float) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(pixels, "RGB").convert("HSV")).copy()
    shift = int(round(shift_of_180 * 256 / 180))  # PIL hue runs 0..255
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def apply_gamma(pixels: np.ndarray, gamma: float) -> np.ndarray:
    normalised = pixels.astype(np.float32) / 255.0
    return np.clip(np.round(normalised**gamma * 255.0), 0, 255).astype(np.uint8)


def to_tensor(pixel_arrays: list[np.ndarray]):
    """Stack uint8 HWC arrays into a float32 (B, 3, H, W) tensor in [-1, 1]."""
    import torch

    batch = torch.from_numpy(np.stack(pixel_arrays)).permute(0, 3, 1, 2)
    return batch.float().div_(127.5).sub_(1.0).contiguous()
