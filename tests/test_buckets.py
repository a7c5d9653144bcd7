"""Buckets vs values worked out by hand from sd-scripts' algorithm (see sd_scripts_trainer.md §2.4)."""
import random

import pytest

from trainer.data.buckets import (
    BucketConfigError,
    Bucketer,
    BucketSettings,
    crop_offsets,
    make_bucket_resolutions,
    parse_resolution,
    resolution_of,
    round_bucket_limits,
    UnbucketableImage,
)

# resolution 512, min 256, max 1024, step 64: the 17 buckets listed in the reference.
EXPECTED_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_make_bucket_resolutions_512_gives_the_17_reference_buckets():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == EXPECTED_512


def test_make_bucket_resolutions_non_square_area():
    # area 768*512 = 393216, sqrt = 627.06 -> square 576. width 512: 393216//512 = 768 -> 768 (<= max 1024).
    resos = make_bucket_resolutions((768, 512), 256, 1024, 64)
    assert (576, 576) in resos and (512, 768) in resos and (768, 512) in resos
    assert resos == sorted(resos)
    assert all(w * h <= 768 * 512 for w, h in resos)
    # width 384: 393216 // 384 = 1024 -> (384, 1024) is allowed since max is 1024
    assert (384, 1024) in resos and (1024, 384) in resos


def test_round_bucket_limits_min_down_max_up():
    assert round_bucket_limits(250, 1000, 64) == (192, 1024)
    assert round_bucket_limits(256, 1024, 64) == (256, 1024)


@pytest.mark.parametrize(
    "size, bucket, resized",
    [
        # ar 2.0: 704x320 (ar 2.2, err .2) beats 640x384 (err .33); 2.0 < 2.2 -> scale by width 0.704
        ((1000, 500), (704, 320), (704, 352)),
        # ar .75: 448x576 (ar .7778); .75 < .7778 -> scale = 448/600, h = 800*0.74667 = 597.3 -> 597
        ((600, 800), (448, 576), (448, 597)),
        # transposed of the above: ar 1.333 > 576/448 = 1.2857 -> scale by height 448/768
        ((1024, 768), (576, 448), (597, 448)),
        # exact bucket size is kept as is
        ((512, 512), (512, 512), (512, 512)),
        ((320, 768), (320, 768), (320, 768)),
        # small square is upscaled to the square bucket
        ((300, 300), (512, 512), (512, 512)),
        # ar 2.1764: 704x320 (err .0236); 2.1764 < 2.2 -> scale = 704/1234, h = 567*.5705 = 323.47 -> 323
        ((1234, 567), (704, 320), (704, 323)),
        # very tall: ar .333 -> 256x832 (ar .3077, err .0256) vs 256x896 (.2857, err .0476)
        ((333, 1000), (256, 832), (277, 832)),
    ],
)
def test_select_bucket_matches_hand_computation(size, bucket, resized):
    choice = Bucketer(BucketSettings((512, 512))).select(*size)
    assert choice.bucket == bucket
    assert choice.resized == resized
    assert choice.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])
    assert choice.resized[0] >= bucket[0] and choice.resized[1] >= bucket[1]


def test_tie_goes_to_first_bucket_in_sorted_order():
    # A made-up bucket list where two buckets are equally far from the image ratio 1.0:
    # 448x512 (.875, err .125) and 576x512 (1.125, err .125). The first in sorted order wins.
    bucketer = Bucketer(BucketSettings((512, 512)))
    bucketer.predefined = [(448, 512), (576, 512)]
    bucketer._predefined_set = set(bucketer.predefined)
    bucketer._aspect_ratios = [w / h for w, h in bucketer.predefined]
    assert bucketer.select(500, 500).bucket == (448, 512)
    bucketer.predefined.reverse()
    bucketer._aspect_ratios.reverse()
    assert bucketer.select(500, 500).bucket == (576, 512)


def test_no_upscale_large_image_is_shrunk_to_the_area():
    # 1000x500 at 512x512 area: w = sqrt(262144*2) = 724.08 -> 704 (ratio err .2 with height 320);
    # h = 362.04 -> 320, width for it 640 (err 0). Height rounding wins: resized (640, 320).
    choice = Bucketer(BucketSettings((512, 512), no_upscale=True)).select(1000, 500)
    assert choice.resized == (640, 320)
    assert choice.bucket == (640, 320)


def test_no_upscale_large_image_width_rounding_wins():
    # 900x1600 (ar .5625) at area 262144: w = 384 exactly -> 384 and 384/.5625 = 682.7 -> 640 (ar .6, err .0375);
    # h = 682.67 -> 683 -> 640, width 360 -> 320 (ar .5, err .0625). Width rounding wins:
    # resized (384, int(384/.5625 + .5) = 683), bucket floors to (384, 640).
    choice = Bucketer(BucketSettings((512, 512), no_upscale=True)).select(900, 1600)
    assert choice.resized == (384, 683)
    assert choice.bucket == (384, 640)


def test_no_upscale_small_image_keeps_its_size_and_is_cropped_down_to_steps():
    choice = Bucketer(BucketSettings((512, 512), no_upscale=True)).select(300, 200)
    assert choice.resized == (300, 200)
    assert choice.bucket == (256, 192)


def test_no_upscale_ignores_min_max():
    # min 256 would reject a 192-high bucket in predefined mode; no_upscale ignores it as sd-scripts does.
    choice = Bucketer(BucketSettings((512, 512), min_reso=256, no_upscale=True)).select(130, 70)
    assert choice.bucket == (128, 64)


def test_no_upscale_too_small_image_raises_and_names_the_fixes():
    with pytest.raises(UnbucketableImage, match="500x40 is smaller than one bucket step") as caught:
        Bucketer(BucketSettings((512, 512), no_upscale=True)).select(500, 40)
    # 40 px: any step of 40 or less fits; 40 is the largest multiple of 8 under 64
    assert caught.value.fix == ("untick Don't upscale bucket resolution, or lower Bucket resolution steps to 40, "
                                "or use a larger version of the image")


def test_no_upscale_large_image_under_a_small_max_area_says_it_is_larger():
    """The issue's case: 512x768 into a 64x64 area is about 52x78, under one 64 px step on its short side."""
    settings = BucketSettings((64, 64), no_upscale=True)
    with pytest.raises(UnbucketableImage) as caught:
        Bucketer(settings).select(512, 768)
    message = str(caught.value)
    assert message.startswith("512x768 is larger than the 64x64 max resolution area")
    assert "about 52x78" in message and "smaller" not in message
    # each fix is real: the changed settings give the image a bucket
    assert caught.value.fix == ("untick Don't upscale bucket resolution and lower Minimum bucket resolution to 64, "
                                "or raise Max resolution to 128,128, or lower Bucket resolution steps to 48, or remove the image")
    assert Bucketer(BucketSettings((64, 64), min_reso=64)).select(512, 768).bucket == (64, 64)
    assert Bucketer(BucketSettings((128, 128), no_upscale=True)).select(512, 768).bucket == (64, 128)
    assert Bucketer(BucketSettings((64, 64), reso_steps=48, no_upscale=True)).select(512, 768).bucket == (48, 48)
    with pytest.raises(BucketConfigError):  # unticking alone is not enough with the default minimum of 256
        Bucketer(BucketSettings((64, 64), min_reso=256))


def test_no_bucket_mode_is_one_bucket_resize_to_cover():
    bucketer = Bucketer(BucketSettings((512, 512), enable_bucket=False))
    choice = bucketer.select(1000, 500)
    assert choice.bucket == (512, 512)
    assert choice.resized == (1024, 512)
    assert bucketer.select(400, 800).resized == (512, 1024)


def test_invalid_min_max_raise_with_the_field_name():
    with pytest.raises(BucketConfigError, match="min_bucket_reso") as caught:
        Bucketer(BucketSettings((512, 512), min_reso=640))
    assert caught.value.field == "min_bucket_reso" and "lower Minimum bucket resolution to 512" in caught.value.fix
    with pytest.raises(BucketConfigError, match="max_bucket_reso") as caught:
        Bucketer(BucketSettings((1024, 512), max_reso=768))
    assert caught.value.field == "max_bucket_reso" and "raise Maximum bucket resolution to 1024" in caught.value.fix


def test_crop_offsets_centre_and_random():
    assert crop_offsets((704, 352), (704, 320)) == (0, 16)
    assert crop_offsets((597, 448), (576, 448)) == (10, 0)
    rng = random.Random(0)
    offsets = {crop_offsets((700, 352), (640, 320), rng) for _ in range(200)}
    assert all(0 <= left <= 60 and 0 <= top <= 32 for left, top in offsets)
    assert len(offsets) > 50
    with pytest.raises(ValueError):
        crop_offsets((100, 100), (128, 64))


def test_parse_resolution_and_settings():
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution("1024,768") == (1024, 768)
    assert parse_resolution(" 768 , 512 ") == (768, 512)
    with pytest.raises(BucketConfigError):
        parse_resolution("abc,")

    class Settings:
        max_resolution = "768,512"
        enable_bucket = True
        min_bucket_reso = 256
        max_bucket_reso = 2048
        bucket_reso_steps = 64
        bucket_no_upscale = False

    assert resolution_of(Settings()) == (768, 512)
    settings = BucketSettings.from_settings(Settings())
    assert settings == BucketSettings((768, 512), True, 256, 2048, 64, False)
