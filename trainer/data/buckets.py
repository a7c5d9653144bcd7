"""Aspect-ratio buckets, exactly as sd-scripts computes them.

``make_bucket_resolutions`` and ``Bucketer.select`` reproduce sd-scripts'
``model_util.make_bucket_resolutions`` and ``BucketManager.select_bucket``
(ties go to the first bucket in sorted order, like numpy's argmin), so the
same images land in the same buckets and a run has the same step count.
Pure Python on purpose: the GUI's live step plan imports this.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, replace
from typing import Any

from trainer.problems import NekoyaError

Size = tuple[int, int]  # (width, height)
MAX_SUGGESTED_SIDE = 4096  # the largest Max resolution a fix suggests


class BucketConfigError(NekoyaError, ValueError):
    """Bucket settings that cannot work together: the setting to change, what is wrong, and the fix."""

    def __init__(self, field: str, message: str, fix: str = "") -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.fix = field, message, fix


class UnbucketableImage(NekoyaError, ValueError):
    """An image no bucket fits (bucket_no_upscale only). ``str()`` says why; ``fix`` lists settings that would fit it."""

    def __init__(self, message: str, settings: "BucketSettings", size: Size) -> None:
        super().__init__(message)
        self.settings, self.size = settings, size

    @property
    def fix(self) -> str:
        return fix_for_unbucketable(self.settings, *self.size)


def parse_resolution(text: str | int | tuple | list) -> Size:
    """``"512"`` -> (512, 512); ``"768,512"`` -> (768, 512) as (width, height), as kohya's ``max_resolution``."""
    try:
        if isinstance(text, (tuple, list)):
            parts = [int(v) for v in text]
        elif isinstance(text, int):
            parts = [text]
        else:
            parts = [int(p) for p in str(text).replace("x", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise BucketConfigError("max_resolution", f"{text!r} is not 'W,H' or 'S' with positive numbers",
                                fix="write width,height, e.g. 512,512")
    return parts[0], parts[1]


def round_bucket_limits(min_reso: int, max_reso: int, steps: int) -> tuple[int, int]:
    """sd-scripts rounds the minimum down and the maximum up to a multiple of the step."""
    if min_reso % steps:
        min_reso -= min_reso % steps
    if max_reso % steps:
        max_reso += steps - max_reso % steps
    return min_reso, max_reso


def make_bucket_resolutions(max_reso: Size, min_size: int, max_size: int, divisible: int) -> list[Size]:
    """All (width, height) buckets with area <= max_reso's area, sorted."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class BucketSettings:
    resolution: Size  # (width, height); its area is the bucket area
    enable_bucket: bool = True
    min_reso: int = 256
    max_reso: int = 1024
    reso_steps: int = 64
    no_upscale: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> "BucketSettings":
        return cls(
            resolution=resolution_of(settings),
            enable_bucket=bool(settings.enable_bucket),
            min_reso=int(settings.min_bucket_reso),
            max_reso=int(settings.max_bucket_reso),
            reso_steps=int(settings.bucket_reso_steps),
            no_upscale=bool(settings.bucket_no_upscale),
        )


def resolution_of(settings: Any) -> Size:
    """The training resolution: the settings model's ``resolution`` helper, else parsed ``max_resolution``."""
    resolution = getattr(settings, "resolution", None)
    if isinstance(resolution, (tuple, list)) and len(resolution) == 2:
        return int(resolution[0]), int(resolution[1])
    return parse_resolution(settings.max_resolution)


@dataclass(frozen=True)
class BucketChoice:
    bucket: Size  # final (width, height) of the training image
    resized: Size  # size the image is resized to before the crop to ``bucket``
    ar_error: float  # bucket aspect ratio minus image aspect ratio


class Bucketer:
    """Assigns image sizes to buckets. Build once per dataset, call ``select`` per image."""

    def __init__(self, settings: BucketSettings) -> None:
        self.settings = settings
        self.max_area = settings.resolution[0] * settings.resolution[1]
        self.steps = settings.reso_steps
        if not settings.enable_bucket:
            self.predefined: list[Size] = [settings.resolution]
        elif settings.no_upscale:
            self.predefined = []  # buckets follow the images; min/max are ignored, as in sd-scripts
            _check_steps(settings.reso_steps)
        else:
            self.predefined = _predefined_buckets(settings)
        self._predefined_set = set(self.predefined)
        self._aspect_ratios = [w / h for w, h in self.predefined]

    @property
    def uses_predefined_buckets(self) -> bool:
        return not (self.settings.enable_bucket and self.settings.no_upscale)

    def select(self, width: int, height: int) -> BucketChoice:
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        aspect_ratio = width / height
        if self.uses_predefined_buckets:
            bucket, resized = self._select_predefined(width, height, aspect_ratio)
        else:
            bucket, resized = self._select_no_upscale(width, height, aspect_ratio)
        return BucketChoice(bucket, resized, bucket[0] / bucket[1] - aspect_ratio)

    def _select_predefined(self, width: int, height: int, aspect_ratio: float) -> tuple[Size, Size]:
        bucket = (width, height)
        if bucket not in self._predefined_set:
            errors = [abs(ar - aspect_ratio) for ar in self._aspect_ratios]
            bucket = self.predefined[errors.index(min(errors))]  # first minimum, like np.argmin
        # scale to cover the bucket: match the side that would otherwise fall short
        if aspect_ratio > bucket[0] / bucket[1]:
            scale = bucket[1] / height
        else:
            scale = bucket[0] / width
        return bucket, (int(width * scale + 0.5), int(height * scale + 0.5))

    def _select_no_upscale(self, width: int, height: int, aspect_ratio: float) -> tuple[Size, Size]:
        if width * height > self.max_area:
            resized = self._shrink_to_area(aspect_ratio)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        if min(bucket) == 0:
            raise UnbucketableImage(self._why_unbucketable(width, height, aspect_ratio), self.settings, (width, height))
        return bucket, resized

    def _why_unbucketable(self, width: int, height: int, aspect_ratio: float) -> str:
        steps = f"one bucket step (bucket_reso_steps {self.steps} px)"
        if width * height <= self.max_area:
            return (f"{width}x{height} is smaller than {steps} on its short side, and "
                    "Don't upscale bucket resolution never enlarges an image, so no bucket fits it")
        # sd-scripts divides by zero at this point; we leave the image out and say why
        max_w, max_h = self.settings.resolution
        scaled_w = math.sqrt(self.max_area * aspect_ratio)
        scaled_h = self.max_area / scaled_w
        return (f"{width}x{height} is larger than the {max_w}x{max_h} max resolution area; scaled down to fit it, "
                f"it is about {scaled_w:.0f}x{scaled_h:.0f}, less than {steps} on its short side, "
                "so no bucket fits it (with Don't upscale bucket resolution, buckets come from the scaled-down image)")

    def _shrink_to_area(self, aspect_ratio: float) -> Size:
        """Fit max_area keeping the aspect ratio; round whichever side keeps the ratio closer."""
        resized_width = math.sqrt(self.max_area * aspect_ratio)
        resized_height = self.max_area / resized_width
        width_rounded = self._round_to_steps(resized_width)
        height_for_width = self._round_to_steps(width_rounded / aspect_ratio)
        height_rounded = self._round_to_steps(resized_height)
        width_for_height = self._round_to_steps(height_rounded * aspect_ratio)
        error_width_rounded = _ratio_error(width_rounded, height_for_width, aspect_ratio)
        error_height_rounded = _ratio_error(width_for_height, height_rounded, aspect_ratio)
        if error_width_rounded < error_height_rounded:
            return width_rounded, int(width_rounded / aspect_ratio + 0.5)
        return int(height_rounded * aspect_ratio + 0.5), height_rounded

    def _round_to_steps(self, x: float) -> int:
        rounded = int(x + 0.5)
        return rounded - rounded % self.steps


def _ratio_error(width: int, height: int, aspect_ratio: float) -> float:
    # sd-scripts divides by zero here for extreme ratios; treat that as the worst fit instead.
    return abs(width / height - aspect_ratio) if height else math.inf


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise BucketConfigError("bucket_reso_steps", f"must be at least 1 (got {steps})", fix="set it to 64 (sd-scripts' default)")


def _fits(settings: BucketSettings, width: int, height: int) -> bool:
    try:
        Bucketer(settings).select(width, height)
    except ValueError:  # BucketConfigError or UnbucketableImage
        return False
    return True


@functools.lru_cache(maxsize=256)
def fix_for_unbucketable(settings: BucketSettings, width: int, height: int) -> str:
    """The settings changes that would fit this image, each checked by selecting its bucket with it."""
    fixes = []
    upscale = replace(settings, no_upscale=False)
    lower_min = replace(upscale, min_reso=min(settings.resolution))
    if _fits(upscale, width, height):
        fixes.append("untick Don't upscale bucket resolution")
    elif _fits(lower_min, width, height):
        fixes.append(f"untick Don't upscale bucket resolution and lower Minimum bucket resolution to {lower_min.min_reso}")
    scaled_down = width * height > settings.resolution[0] * settings.resolution[1]
    if scaled_down:
        larger = (s for s in range(settings.reso_steps, MAX_SUGGESTED_SIDE + 1, settings.reso_steps) if s > max(settings.resolution))
        side = next((s for s in larger if _fits(replace(settings, resolution=(s, s)), width, height)), None)
        if side is not None:
            fixes.append(f"raise Max resolution to {side},{side}")
    # multiples of 8 only: a bucket side must divide into whole latent pixels
    finer = (s for s in range(settings.reso_steps - 1, 0, -1) if s % 8 == 0)
    steps = next((s for s in finer if _fits(replace(settings, reso_steps=s), width, height)), None)
    if steps is not None:
        fixes.append(f"lower Bucket resolution steps to {steps}")
    fixes.append("remove the image" if scaled_down else "use a larger version of the image")
    return ", or ".join(fixes)


def _predefined_buckets(settings: BucketSettings) -> list[Size]:
    _check_steps(settings.reso_steps)
    min_reso, max_reso = round_bucket_limits(settings.min_reso, settings.max_reso, settings.reso_steps)
    width, height = settings.resolution
    if min(width, height) < min_reso:
        rounded = "" if min_reso == settings.min_reso else f" (rounded down to a multiple of {settings.reso_steps}: {min_reso})"
        raise BucketConfigError(
            "min_bucket_reso",
            f"Minimum bucket resolution {settings.min_reso}{rounded} is larger than the smaller side of Max resolution "
            f"({width}x{height}); sd-scripts refuses this too",
            fix=f"lower Minimum bucket resolution to {min(width, height)} or less, or raise Max resolution",
        )
    if max(width, height) > max_reso:
        rounded = "" if max_reso == settings.max_reso else f" (rounded up to a multiple of {settings.reso_steps}: {max_reso})"
        raise BucketConfigError(
            "max_bucket_reso",
            f"Maximum bucket resolution {settings.max_reso}{rounded} is smaller than the larger side of Max resolution "
            f"({width}x{height}); sd-scripts refuses this too",
            fix=f"raise Maximum bucket resolution to {max(width, height)} or more, or lower Max resolution",
        )
    return make_bucket_resolutions(settings.resolution, min_reso, max_reso, settings.reso_steps)


def crop_offsets(resized: Size, bucket: Size, rng: random.Random | None = None) -> Size:
    """(left, top) of the crop from the resized image to the bucket: centred, or uniform when ``rng`` is given."""
    excess_w, excess_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if excess_w < 0 or excess_h < 0:
        raise ValueError(f"resized size {resized} does not cover bucket {bucket}")
    if rng is None:
        return excess_w // 2, excess_h // 2
    return rng.randint(0, excess_w), rng.randint(0, excess_h)

