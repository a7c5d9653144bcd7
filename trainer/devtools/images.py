"""Synthetic kohya-layout image folders: coloured shapes with matching captions.

Layout (what kohya calls ``train_data_dir``)::

    root/
      10_sks dog/          # "<repeats>_<instance/class tokens>"
        000.png  000.txt   # caption "sks dog, red circle on a blue background"
        001.jpg  001.txt
"""
from __future__ import annotations

import random
from pathlib import Path

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
    "yellow": (235, 210, 40), "purple": (140, 50, 170), "white": (245, 245, 245),
    "black": (15, 15, 15), "orange": (240, 140, 30),
}
# shape name -> how to draw it in the square (x0, y0, side)
SHAPES = {
    "circle": lambda d, x, y, s, c: d.ellipse((x, y, x + s, y + s), fill=c),
    "square": lambda d, x, y, s, c: d.rectangle((x, y, x + s, y + s), fill=c),
    "triangle": lambda d, x, y, s, c: d.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=c),
}
FORMATS = (("PNG", ".png"), ("JPEG", ".jpg"))
DEFAULT_SIZES = ((64, 64), (96, 64), (64, 96))


def make_image_folder(
    root,
    concepts: dict[str, int] | None = None,
    sizes=DEFAULT_SIZES,
    captions: bool | str = True,
    caption_extension: str = ".txt",
    seed: int = 0,
) -> Path:
    """Create one sub-folder per concept (``{"10_sks dog": 4}`` = 4 images) under ``root``.

    ``captions``: True = every image has a caption file, False = none,
    "some" = every other image (the rest fall back to the folder's tokens).
    Image sizes cycle through ``sizes``; formats alternate PNG / JPEG.
    """
    if captions not in (True, False, "some"):
        raise ValueError(f"captions must be True, False or 'some', not {captions!r}")
    root = Path(root)
    rng = random.Random(seed)
    for concept, count in (concepts or {"10_sks dog": 4}).items():
        folder = root / concept
        folder.mkdir(parents=True, exist_ok=True)
        tokens = concept.split("_", 1)[1] if "_" in concept else concept
        for index in range(count):
            size = tuple(sizes[index % len(sizes)])
            image_format, suffix = FORMATS[index % len(FORMATS)]
            image, description = draw_shape(size, rng)
            stem = folder / f"{index:03d}"
            image.save(stem.with_suffix(suffix), format=image_format)
            if captions is True or (captions == "some" and index % 2 == 0):
                stem.with_suffix(caption_extension).write_text(f"{tokens}, {description}\n", encoding="utf-8")
    return root


def draw_shape(size: tuple[int, int], rng: random.Random):
    """A random shape on a plain background; returns (PIL image, caption text)."""
    from PIL import Image, ImageDraw

    shape = rng.choice(sorted(SHAPES))
    fg, bg = rng.sample(sorted(COLOURS), 2)
    width, height = size
    image = Image.new("RGB", size, COLOURS[bg])
    draw = ImageDraw.Draw(image)
    side = rng.randint(min(size) // 3, min(size) * 3 // 4)
    x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
    SHAPES[shape](draw, x0, y0, side, COLOURS[fg])
    return image, f"{fg} {shape} on a {bg} background"


def add_corrupt_image(folder, name: str = "corrupt.png") -> Path:
    """A file with an image extension whose bytes are not a decodable image."""
    path = Path(folder) / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not image data" * 4)
    return path


def add_tiny_image(folder, name: str = "tiny.png", size: tuple[int, int] = (8, 8), caption_extension: str | None = ".txt") -> Path:
    """A valid image far smaller than any training resolution (for preflight checks)."""
    from PIL import Image

    path = Path(folder) / name
    Image.new("RGB", size, COLOURS["red"]).save(path)
    if caption_extension:
        path.with_suffix(caption_extension).write_text("tiny image\n", encoding="utf-8")
    return path
