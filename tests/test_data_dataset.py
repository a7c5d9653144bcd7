"""Epoch iteration: repeats, buckets, determinism, resume, bad images, loss weights."""
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from trainer.data.dataset import DatasetConfig, TrainingDataset
from trainer.data.images import BadImageError
from trainer.data.plan import plan_steps

SIZES = [(64, 64), (96, 48), (48, 96), (80, 40), (64, 64)]


def _settings(root: Path, **overrides):
    values = dict(
        train_data_dir=str(root / "img"), reg_data_dir=str(root / "reg"), caption_extension=".txt",
        train_batch_size=2, gradient_accumulation_steps=1, epoch=1, max_train_epochs=0, max_train_steps=0,
        max_resolution="64", enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
        bucket_no_upscale=False, seed=42, prior_loss_weight=0.5, flip_aug=True, color_aug=False, random_crop=False,
        shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0,
        max_data_loader_n_workers=0,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    for folder, repeats in (("3_sks cat", 3), ("2_sks dog", 2)):
        for i, size in enumerate(SIZES):
            path = root / "img" / folder / f"{folder.split()[-1]}{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, (40 * i, 100, 200)).save(path)
            path.with_suffix(".txt").write_text(f"{folder[2:]}, tag{i}, red, blue, green")
    for i in range(3):
        path = root / "reg" / "1_animal" / f"reg{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (0, 0, 10 * i)).save(path)
    return root


@pytest.fixture(scope="module")
def dataset(data_root) -> TrainingDataset:
    return TrainingDataset.from_settings(_settings(data_root))


def _epoch(dataset, epoch, start=0):
    return list(dataset.iter_epoch(epoch, start_batch=start))


def test_each_image_appears_repeats_times_and_reg_is_balanced(dataset):
    batches = _epoch(dataset, 1)
    counts = Counter(path.name for batch in batches for path in batch.paths)
    for i in range(len(SIZES)):
        assert counts[f"cat{i}.png"] == 3 and counts[f"dog{i}.png"] == 2
    # 25 train samples, 3 reg images with 1 repeat -> round robin to 25: 9, 8, 8
    assert [counts[f"reg{i}.png"] for i in range(3)] == [9, 8, 8]
    assert len(batches) == len(dataset) == plan_steps(_settings(Path(dataset.entries[0].item.path).parents[2])).batches_per_epoch


def test_batches_never_mix_buckets_and_carry_sizes(dataset):
    for batch in _epoch(dataset, 1):
        width, height = batch.bucket
        assert batch.images.shape == (len(batch), 3, height, width)
        assert batch.target_sizes_hw == [(height, width)] * len(batch)
        assert batch.images.min() >= -1.0 and batch.images.max() <= 1.0
        assert batch.size_conditioning().shape == (len(batch), 6)
        for path, original in zip(batch.paths, batch.original_sizes_hw):
            with Image.open(path) as image:
                assert original == (image.height, image.width)
        assert len(batch) <= 2


def test_loss_weights_use_prior_loss_weight_for_reg(dataset):
    for batch in _epoch(dataset, 1):
        expected = [0.5 if reg else 1.0 for reg in batch.is_reg]
        assert batch.loss_weights.tolist() == expected
        assert batch.is_reg == [p.parent.name == "1_animal" for p in batch.paths]


def test_same_seed_same_order_other_epoch_other_order(data_root, dataset):
    again = TrainingDataset.from_settings(_settings(data_root))
    assert dataset.epoch_batches(1) == again.epoch_batches(1)
    assert dataset.epoch_batches(1) != dataset.epoch_batches(2)
    other_seed = TrainingDataset.from_settings(_settings(data_root, seed=7))
    assert other_seed.epoch_batches(1) != dataset.epoch_batches(1)
    first, second = _epoch(dataset, 1), _epoch(again, 1)
    assert [b.captions for b in first] == [b.captions for b in second]
    assert [b.flipped for b in first] == [b.flipped for b in second]


def test_resume_skipping_n_batches_equals_the_uninterrupted_tail(dataset):
    full = _epoch(dataset, 2)
    tail = _epoch(dataset, 2, start=5)
    assert len(tail) == len(full) - 5
    for a, b in zip(full[5:], tail):
        assert a.index == b.index and a.paths == b.paths and a.captions == b.captions and a.flipped == b.flipped
        assert torch.equal(a.images, b.images)
        assert a.crop_top_lefts == b.crop_top_lefts


def test_augmentations_vary_and_captions_keep_the_first_token(dataset):
    batches = _epoch(dataset, 1)
    flips = [f for b in batches for f in b.flipped]
    assert any(flips) and not all(flips)
    for batch in batches:
        for path, caption in zip(batch.paths, batch.captions):
            if path.parent.name == "3_sks cat":
                assert caption.split(", ")[0] == "sks cat"
            elif path.parent.name == "1_animal":
                assert caption == "animal"  # class tokens, no caption file


def test_threaded_loading_gives_the_same_batches(data_root, dataset):
    threaded = TrainingDataset.from_settings(_settings(data_root, max_data_loader_n_workers=2))
    for a, b in zip(_epoch(dataset, 3), _epoch(threaded, 3)):
        assert a.paths == b.paths and a.captions == b.captions and torch.equal(a.images, b.images)


def test_bad_image_is_reported_by_name_then_skipped_or_raised(tmp_path):
    folder = tmp_path / "img" / "2_x"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64)).save(folder / f"ok{i}.png")
    Image.new("RGB", (64, 64)).save(folder / "bad.png")
    settings = _settings(tmp_path, reg_data_dir="", flip_aug=False)
    plan = plan_steps(settings)
    (folder / "bad.png").write_bytes((folder / "bad.png").read_bytes()[:60])  # truncated after the scan

    reported = []
    skipping = TrainingDataset(plan.entries, DatasetConfig.from_settings(settings), on_bad_image=reported.append)
    batches = _epoch(skipping, 1)
    assert [e.path.name for e in reported] == ["bad.png"]  # reported once although it appears twice
    seen = Counter(p.name for b in batches for p in b.paths)
    assert seen == {"ok0.png": 2, "ok1.png": 2, "ok2.png": 2}

    strict = TrainingDataset(plan.entries, DatasetConfig.from_settings(settings, skip_bad_images=False))
    with pytest.raises(BadImageError) as raised:
        _epoch(strict, 1)
    assert raised.value.path.name == "bad.png"


def test_resume_position_maps_steps_to_epoch_and_batch(data_root):
    plan = plan_steps(_settings(data_root, gradient_accumulation_steps=2))
    assert plan.resume_position(0) == (1, 0)
    assert plan.resume_position(plan.steps_per_epoch + 1) == (2, 2)


@pytest.mark.parametrize(
    "overrides, expected_buckets",
    [
        # one bucket at the resolution: every image is resized to cover 64x64 and centre-cropped
        (dict(enable_bucket=False), {(64, 64)}),
        # no_upscale, area 4096, step 16: 64x64 stays; 96x48 (area 4608) shrinks to 64x32 (height rounding:
        # exact ratio); 48x96 shrinks to 32x64 (width rounding wins); 80x40 keeps its size, bucket floors to 80x32
        (dict(bucket_no_upscale=True), {(64, 64), (64, 32), (32, 64), (80, 32)}),
    ],
)
def test_no_bucket_and_no_upscale_modes(data_root, overrides, expected_buckets):
    dataset = TrainingDataset.from_settings(_settings(data_root, reg_data_dir="", flip_aug=False, **overrides))
    buckets = set()
    for batch in dataset.iter_epoch(1):
        width, height = batch.bucket
        assert batch.images.shape[2:] == (height, width)
        buckets.add(batch.bucket)
    assert buckets == expected_buckets
