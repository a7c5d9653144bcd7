"""masked_loss: the alpha channel weights the loss per latent pixel, as sd-scripts' apply_masked_loss (issue #16)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.buckets import BucketChoice
from trainer.data.dataset import CachedLatents, DatasetConfig, TrainingDataset
from trainer.data.folders import ImageItem
from trainer.data.images import prepare_image, prepare_mask
from trainer.data.samples import Entry
from trainer.loss import latent_mask, per_sample_loss


def _alpha_pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def _rgba(path: Path, alpha: np.ndarray, rgb=(200, 30, 90)) -> Path:
    pixels = np.zeros((*alpha.shape, 4), dtype=np.uint8)
    pixels[..., :3] = rgb
    pixels[..., 3] = alpha
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def _entry(path: Path, choice: BucketChoice, is_reg: bool = False) -> Entry:
    width, height = Image.open(path).size
    item = ImageItem(path, width, height, "a caption", 1, is_reg, "1_thing", True)
    return Entry(item, 1, choice)


# --- the loss ---------------------------------------------------------------------------------------------------


def test_a_fully_transparent_region_gives_no_gradient():
    torch.manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    mask = torch.ones(2, 64, 64)
    mask[:, :, :32] = 0.0  # left half of the image transparent: the left 4 latent columns
    per_sample_loss(pred, target, "l2", None, mask).sum().backward()
    assert torch.count_nonzero(pred.grad[..., :4]) == 0
    assert torch.count_nonzero(pred.grad[..., 4:]) == pred.grad[..., 4:].numel()


def test_the_mask_multiplies_before_the_mean_over_every_element():
    torch.manual_seed(1)
    pred, target = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    plain = per_sample_loss(pred, target)
    assert torch.allclose(per_sample_loss(pred, target, mask=torch.ones(1, 64, 64)), plain)
    half = torch.ones(1, 64, 64) * 0.5
    assert torch.allclose(per_sample_loss(pred, target, mask=half), plain * 0.5)  # sd-scripts: not renormalised
    mask = torch.rand(1, 64, 64)
    element = (pred - target) ** 2 * torch.nn.functional.avg_pool2d(mask[:, None], 8)
    assert torch.allclose(per_sample_loss(pred, target, mask=mask), element.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("loss_type", ["l1", "huber", "smooth_l1"])
def test_every_loss_type_is_masked(loss_type):
    pred, target = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 8, 8)
    per_sample_loss(pred, target, loss_type, torch.full((2,), 0.1), torch.zeros(2, 64, 64)).sum().backward()
    assert torch.count_nonzero(pred.grad) == 0


def test_latent_mask_is_the_area_average():
    mask = torch.rand(3, 64, 96)
    assert latent_mask(mask, (8, 12)).shape == (3, 1, 8, 12)
    assert torch.allclose(latent_mask(mask, (8, 12)), torch.nn.functional.avg_pool2d(mask[:, None], 8))


# --- the mask follows the image -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_mask_is_resized_cropped_and_flipped_like_its_image(tmp_path, flip, seed):
    alpha = _alpha_pattern(100, 80, seed)
    masked = _rgba(tmp_path / "masked.png", alpha)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.stack([alpha] * 3, axis=-1), "RGB").save(gray)  # the alpha as visible pixels
    choice = BucketChoice(bucket=(64, 48), resized=(80, 64), ar_error=0.0)
    image = prepare_image(gray, choice, flip=flip, crop_rng=random.Random(seed))
    mask = prepare_mask(masked, choice, flip=flip, crop_left_top=image.crop_left_top)
    assert mask.shape == (48, 64) and mask.dtype == np.float32
    assert np.abs(mask - image.pixels[..., 0] / 255.0).max() <= 2 / 255


def test_an_image_without_alpha_is_all_ones(tmp_path):
    path = tmp_path / "plain.jpg"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(path)
    mask = prepare_mask(path, BucketChoice((64, 64), (64, 64), 0.0), flip=False, crop_left_top=(0, 0))
    assert mask.shape == (64, 64) and (mask == 1.0).all()


class _FakeLatents:
    def __init__(self):
        self.calls = 0

    def get(self, entry, flipped):
        self.calls += 1
        width, height = entry.choice.bucket
        return CachedLatents(torch.zeros(4, height // 8, width // 8), (width, height), (0, 0))


@pytest.mark.parametrize("cached", [False, True])
def test_batches_carry_masks_with_pixels_and_with_cached_latents(tmp_path, cached):
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, 32:] = 255
    entries = [_entry(_rgba(tmp_path / f"{i}.png", alpha), BucketChoice((64, 64), (64, 64), 0.0)) for i in range(2)]
    latents = _FakeLatents() if cached else None
    dataset = TrainingDataset(entries, DatasetConfig(batch_size=2, masked_loss=True), latents=latents)
    [batch] = list(dataset.iter_epoch(1))
    assert batch.masks.shape == (2, 64, 64)
    assert (batch.masks[:, :, :32] == 0).all() and (batch.masks[:, :, 32:] == 1).all()
    assert (batch.latents is not None) == cached and (batch.images is not None) != cached
    plain = TrainingDataset(entries, DatasetConfig(batch_size=2), latents=latents)
    assert next(iter(plain.iter_epoch(1))).masks is None


def test_a_flipped_sample_gets_a_flipped_mask(tmp_path):
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, 32:] = 255
    entry = _entry(_rgba(tmp_path / "a.png", alpha), BucketChoice((64, 64), (64, 64), 0.0))
    dataset = TrainingDataset([entry], DatasetConfig(batch_size=1, flip_aug=True, masked_loss=True))
    for epoch in range(1, 9):
        [batch] = list(dataset.iter_epoch(epoch))
        opaque_right = bool((batch.masks[0, :, 32:] == 1).all())
        assert opaque_right != batch.flipped[0]


# --- the check ----------------------------------------------------------------------------------------------------


def _check(folder, **values):
    from trainer.preflight import check
    from trainer.settings.kohya_json import settings_from_dict

    settings = settings_from_dict({"train_data_dir": str(folder), "max_resolution": "64,64", **values}).settings
    return check(settings, deep=False, checks=["dataset.masked_loss"])


def test_the_check_refuses_images_without_alpha_naming_them(tmp_path):
    folder = tmp_path / "img" / "1_thing"
    folder.mkdir(parents=True)
    _rgba(folder / "ok.png", _alpha_pattern(64, 64))
    Image.new("RGB", (64, 64)).save(folder / "opaque.jpg")
    Image.new("RGB", (64, 64)).save(folder / "opaque.png")
    report = _check(tmp_path / "img", masked_loss=True)
    [error] = [p for p in report.errors if p.field == "masked_loss"]
    assert "2 training images have none" in error.message
    assert str(folder / "opaque.jpg") in error.message and str(folder / "opaque.png") in error.message
    assert "ok.png" not in error.message
    assert not _check(tmp_path / "img", masked_loss=False).errors


def test_the_check_passes_when_every_image_has_alpha(tmp_path):
    folder = tmp_path / "img" / "1_thing"
    folder.mkdir(parents=True)
    for i in range(3):
        _rgba(folder / f"{i}.png", _alpha_pattern(64, 64, i))
    assert not [p for p in _check(tmp_path / "img", masked_loss=True).problems if p.field == "masked_loss"]


def test_masked_loss_is_a_declared_setting_not_a_warned_one():
    from trainer.settings import setting_info
    from trainer.settings.kohya_unused import is_kohya_unused

    assert setting_info("masked_loss").label == "Masked loss"
    assert not is_kohya_unused("masked_loss")


# --- a run ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("cache_latents", [True, False])
def test_a_fully_transparent_dataset_trains_with_zero_loss(tiny_sd1_dir, tmp_path, cache_latents):
    from test_train import Recorder, tiny_settings
    from trainer import events as ev
    from trainer.loop import train
    from trainer.noise_sampling import FixedNoise

    folder = tmp_path / "img" / "1_thing"
    folder.mkdir(parents=True)
    for i in range(2):
        _rgba(folder / f"{i}.png", np.zeros((64, 64), dtype=np.uint8))
    recorder = Recorder()
    settings = tiny_settings(tiny_sd1_dir, tmp_path / "img", tmp_path / "out", masked_loss=True,
                             cache_latents=cache_latents)
    result = train(settings, recorder, noise=FixedNoise)
    assert result.status == "finished", result.error
    assert [s.loss for s in recorder.of(ev.Step)] == [0.0, 0.0]


# --- masks from a dataset config's conditioning_data_dir ---------------------------------------------------------


def _toml_dataset(tmp_path, masks: dict[str, np.ndarray], images=("a", "b")):
    image_dir, mask_dir = tmp_path / "img", tmp_path / "masks"
    image_dir.mkdir()
    mask_dir.mkdir()
    for name in images:
        Image.new("RGB", (64, 64), (10, 200, 30)).save(image_dir / f"{name}.jpg")
        (image_dir / f"{name}.txt").write_text("a caption")
    for name, red in masks.items():
        pixels = np.zeros((64, 64, 3), dtype=np.uint8)
        pixels[..., 0] = red
        pixels[..., 1] = 255 - red  # only the red channel counts
        Image.fromarray(pixels, "RGB").save(mask_dir / f"{name}.png")
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 2\n\n  [[datasets.subsets]]\n"
                    f"  image_dir = '{image_dir}'\n  num_repeats = 1\n  caption_extension = '.txt'\n"
                    f"  conditioning_data_dir = '{mask_dir}'\n")
    return toml, image_dir, mask_dir


def _toml_settings(toml, **values):
    from trainer.settings.kohya_json import settings_from_dict

    return settings_from_dict({"dataset_config": str(toml), "max_resolution": "64,64", **values}).settings


def test_conditioning_data_dir_is_refused_without_masked_loss_and_read_with_it(tmp_path):
    from trainer.data.dataset_config import DatasetConfigError, load_dataset_config

    toml, _, mask_dir = _toml_dataset(tmp_path, {})
    with pytest.raises(DatasetConfigError, match="conditioning_data_dir: a ControlNet subset is not supported"):
        load_dataset_config(_toml_settings(toml))
    [subset] = load_dataset_config(_toml_settings(toml, masked_loss=True)).subsets
    assert subset.conditioning_data_dir == mask_dir


def test_a_mask_folder_gives_each_image_the_red_channel_of_its_mask(tmp_path):
    from trainer.data.plan import plan_steps

    left = np.zeros((64, 64), dtype=np.uint8)
    left[:, :32] = 255
    toml, _, _ = _toml_dataset(tmp_path, {"a": left, "b": 255 - left})
    settings = _toml_settings(toml, masked_loss=True)
    plan = plan_steps(settings)
    assert not plan.errors
    dataset = TrainingDataset(plan.entries, DatasetConfig.from_settings(settings))
    [batch] = list(dataset.iter_epoch(1))
    for path, mask in zip(batch.paths, batch.masks):
        counted = mask[:, :32] if path.stem == "a" else mask[:, 32:]
        assert (counted == 1).all() and (mask.sum() == 64 * 32)


def test_the_check_names_images_without_a_mask_in_the_folder(tmp_path):
    from trainer.preflight import check

    toml, image_dir, _ = _toml_dataset(tmp_path, {"a": np.full((64, 64), 255, dtype=np.uint8)})
    report = check(_toml_settings(toml, masked_loss=True), deep=False, checks=["dataset.masked_loss"])
    [error] = report.errors
    assert error.field == "dataset_config" and str(image_dir / "b.jpg") in error.message
    assert "a.jpg" not in error.message and "alpha" not in error.message
    (tmp_path / "masks" / "b.png").write_bytes((tmp_path / "masks" / "a.png").read_bytes())
    assert not check(_toml_settings(toml, masked_loss=True), deep=False, checks=["dataset.masked_loss"]).errors
