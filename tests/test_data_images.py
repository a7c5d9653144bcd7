"""Image loading, resize/crop to a bucket, flip, colour augmentation, tensor conversion."""
import random

import numpy as np
import pytest
from PIL import Image

from trainer.data.buckets import BucketChoice
from trainer.data.images import (
    BadImageError,
    apply_gamma,
    color_augment,
    load_rgb,
    prepare_image,
    resize,
    shift_hue,
    to_tensor,
)


def _left_right_image(path, size=(80, 40)):
    """Left half red, right half blue: flips and crops are visible."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    image.save(path)
    return path


def test_load_applies_exif_rotation(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 40), (10, 200, 10)).save(path, exif=exif.tobytes())
    assert load_rgb(path).size == (40, 80)


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (255, 255, 255)


def test_bad_image_raises_with_path(tmp_path):
    path = tmp_path / "broken.png"
    Image.new("RGB", (64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(BadImageError) as raised:
        load_rgb(path)
    assert raised.value.path == path and str(path) in str(raised.value)


def test_resize_uses_area_for_shrinking_and_keeps_means():
    checker = np.indices((64, 64)).sum(axis=0) % 2 * 255
    image = Image.fromarray(np.stack([checker] * 3, -1).astype(np.uint8))
    small = np.asarray(resize(image, (32, 32)))
    assert np.all(np.abs(small.astype(int) - 127) <= 1)  # box filter averages 2x2 exactly
    assert resize(image, (64, 64)) is image
    assert resize(image, (96, 80)).size == (96, 80)


def test_prepare_centre_crop_and_flip(tmp_path):
    path = _left_right_image(tmp_path / "lr.png")  # 80x40
    choice = BucketChoice(bucket=(48, 32), resized=(64, 32), ar_error=0.0)
    plain = prepare_image(path, choice)
    assert plain.pixels.shape == (32, 48, 3) and plain.original_size == (80, 40)
    assert plain.crop_left_top == (8, 0)
    assert tuple(plain.pixels[5, 2]) == (255, 0, 0) and tuple(plain.pixels[5, 45]) == (0, 0, 255)
    flipped = prepare_image(path, choice, flip=True)
    assert np.array_equal(flipped.pixels, plain.pixels[:, ::-1])
    assert flipped.crop_left_top == (64 - 8 - 48, 0)


def test_random_crop_is_seeded(tmp_path):
    path = _left_right_image(tmp_path / "lr.png")
    choice = BucketChoice(bucket=(32, 32), resized=(80, 40), ar_error=0.0)
    crops = {prepare_image(path, choice, crop_rng=random.Random(s)).crop_left_top for s in range(20)}
    assert len(crops) > 5 and all(0 <= left <= 48 and 0 <= top <= 8 for left, top in crops)
    a = prepare_image(path, choice, crop_rng=random.Random(3))
    b = prepare_image(path, choice, crop_rng=random.Random(3))
    assert a.crop_left_top == b.crop_left_top and np.array_equal(a.pixels, b.pixels)


def test_color_aug_hue_and_gamma():
    pixels = np.full((4, 4, 3), (200, 60, 60), dtype=np.uint8)
    shifted = shift_hue(pixels, 8.0)
    assert shifted.shape == pixels.shape and not np.array_equal(shifted, pixels)
    assert abs(int(shifted[0, 0, 0]) - 200) <= 3  # hue moved a little, brightness kept
    assert np.array_equal(apply_gamma(pixels, 1.0), pixels)
    darker = apply_gamma(np.full((2, 2, 3), 128, np.uint8), 1.05)
    assert 120 <= darker[0, 0, 0] < 128  # a real gamma: no saturation of mid tones
    assert apply_gamma(np.full((1, 1, 3), 255, np.uint8), 1.05)[0, 0, 0] == 255
    changed = sum(not np.array_equal(color_augment(pixels, random.Random(s)), pixels) for s in range(300))
    assert 60 < changed < 140  # about a third of the calls


def test_to_tensor_range_and_layout():
    arrays = [np.zeros((4, 6, 3), np.uint8), np.full((4, 6, 3), 255, np.uint8)]
    tensor = to_tensor(arrays)
    assert tuple(tensor.shape) == (2, 3, 4, 6)
    assert tensor[0].max().item() == -1.0 and tensor[1].min().item() == 1.0


def test_huge_image_is_a_bad_image_naming_its_size_not_a_decompression_bomb(tmp_path):
    from test_preflight_support import write_huge_png

    path = write_huge_png(tmp_path / "panorama.png")
    with pytest.raises(BadImageError) as raised:
        prepare_image(path, BucketChoice((64, 64), (64, 64), 0.0))
    assert raised.value.path == path
    assert raised.value.reason.startswith("30000×30000 pixels (900 MP); images over 179 MP are not read")
