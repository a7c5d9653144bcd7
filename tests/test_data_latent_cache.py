"""Latent cache: memory and disk round trips, reuse across runs, invalidation, flip, dataset use.

The encoding on first use itself (counts, order independence, threads, bad images) is in test_lazy_latents.py."""
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.data.dataset import DatasetConfig, TrainingDataset
from trainer.data.images import prepare_image, to_tensor
from trainer.data.latent_cache import CacheSpec, LatentCache, LatentCacheError, latent_caching_blockers
from trainer.data.plan import plan_steps

SIZES = [(64, 64), (96, 48), (48, 96), (64, 64), (80, 40)]


class CountingEncoder:
    """Stands in for a VAE: 8x8 average pooling, counting every image it sees."""

    def __init__(self):
        self.images = 0
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, pixels: torch.Tensor, generators=None) -> torch.Tensor:
        self.images += pixels.shape[0]
        self.calls.append(tuple(pixels.shape))
        return F.avg_pool2d(pixels, 8)


def _settings(root: Path, **overrides):
    values = dict(
        train_data_dir=str(root), reg_data_dir="", caption_extension=".txt", train_batch_size=2,
        gradient_accumulation_steps=1, epoch=1, max_train_epochs=0, max_train_steps=0, max_resolution="64",
        enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16, bucket_no_upscale=False,
        seed=1, prior_loss_weight=1.0, flip_aug=True, color_aug=False, random_crop=False, shuffle_caption=False,
        keep_tokens=0, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0,
        max_data_loader_n_workers=0,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def write_images(root: Path, folder: str, sizes, red_step: int) -> Path:
    """One plain-colour PNG per size in ``root/folder`` (a kohya ``<repeats>_<name>`` folder)."""
    for i, size in enumerate(sizes):
        path = root / folder / f"im{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", size, (red_step * i, 120, 255 - 40 * i)).save(path)
    return root


@pytest.fixture()
def image_root(tmp_path) -> Path:
    return write_images(tmp_path, "3_thing", SIZES, red_step=50)


def _entries(root, **overrides):
    return list(plan_steps(_settings(root, **overrides)).entries)


def _filled(encoder, entries, **spec) -> tuple[LatentCache, object]:
    """A cache with every entry encoded up front (prepare, then encode_missing) and its report."""
    cache = LatentCache(CacheSpec(encoder, **spec))
    cache.prepare(entries)
    return cache, cache.encode_missing()


def test_memory_cache_round_trip_with_flip(image_root):
    entries = _entries(image_root)
    encoder = CountingEncoder()
    cache = LatentCache(CacheSpec(encoder, flip=True))
    report = cache.prepare(entries)
    assert (report.encoded, report.reused, report.failed, report.pending) == (0, 0, [], 5)
    assert encoder.images == 0 and not cache.complete  # nothing is encoded before it is asked for
    entry = entries[1]
    got = cache.get(entry, flipped=False)
    assert encoder.images == 2  # normal + flipped, of this image only (vae_batch_size 1)
    expected = encoder(to_tensor([prepare_image(entry.item.path, entry.choice).pixels]))[0]
    assert torch.allclose(got.latents, expected)
    assert got.original_size == (entry.item.width, entry.item.height)
    assert torch.allclose(cache.get(entry, flipped=True).latents, torch.flip(expected, dims=[2]), atol=1e-6)
    report = cache.encode_missing()
    assert (report.encoded, report.reused, report.failed, report.pending) == (5, 0, [], 0) and cache.complete
    assert encoder.images == 2 + 1 + 8  # the check above, then the 4 other images, normal + flipped
    assert not any(p.suffix == ".npz" for p in image_root.rglob("*"))


def test_encoder_batches_hold_one_bucket_and_respect_vae_batch_size(image_root):
    encoder = CountingEncoder()
    _filled(encoder, _entries(image_root), batch_size=2)
    # buckets (w x h): 48x80 (1 image), 64x64 (2), 80x48 (96x48 and 80x40, both ratio 2)
    assert encoder.calls == [(1, 3, 80, 48), (2, 3, 64, 64), (2, 3, 48, 80)]
    encoder = CountingEncoder()
    _filled(encoder, _entries(image_root), batch_size=1)
    assert [shape[0] for shape in encoder.calls] == [1] * 5


def test_first_use_encodes_the_entrys_whole_chunk_once(image_root):
    entries = _entries(image_root)  # im0 and im3 share the 64x64 bucket
    encoder = CountingEncoder()
    cache = LatentCache(CacheSpec(encoder, batch_size=2))
    cache.prepare(entries)
    cache.get(entries[3], flipped=False)
    assert encoder.calls == [(2, 3, 64, 64)]  # with im0, as up-front caching would have batched them
    cache.get(entries[0], flipped=False)
    assert encoder.calls == [(2, 3, 64, 64)] and cache.report.pending == 3


def test_disk_cache_is_reused_by_a_second_run(image_root):
    first = CountingEncoder()
    _filled(first, _entries(image_root), to_disk=True, flip=True, fingerprint="vae-a")
    npz = image_root / "3_thing" / "im1_0096x0048_sd.npz"
    assert npz.is_file()
    with np.load(npz) as data:
        assert {"latents_6x10", "original_size_6x10", "crop_ltrb_6x10", "latents_flipped_6x10"} <= set(data.files)
        assert data["latents_6x10"].shape == (3, 6, 10)
        assert data["original_size_6x10"].tolist() == [96, 48]

    second = CountingEncoder()
    entries = _entries(image_root)
    cache = LatentCache(CacheSpec(second, to_disk=True, flip=True, fingerprint="vae-a"))
    report = cache.prepare(entries)
    assert second.images == 0 and (report.encoded, report.reused, report.pending) == (0, 5, 0) and cache.complete
    entry = entries[0]
    expected = first(to_tensor([prepare_image(entry.item.path, entry.choice).pixels]))[0]
    assert torch.allclose(cache.get(entry, flipped=False).latents, expected)


def test_changed_image_or_encoder_or_flip_re_encodes(image_root):
    spec = dict(to_disk=True, flip=False, fingerprint="vae-a")
    _filled(CountingEncoder(), _entries(image_root), **spec)

    changed = image_root / "3_thing" / "im2.png"
    Image.new("RGB", (48, 96), (1, 2, 3)).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    encoder = CountingEncoder()
    _, report = _filled(encoder, _entries(image_root), **spec)
    assert (report.encoded, report.reused, encoder.images) == (1, 4, 1)

    encoder = CountingEncoder()
    _filled(encoder, _entries(image_root), **{**spec, "fingerprint": "vae-b"})
    assert encoder.images == 5

    encoder = CountingEncoder()
    _filled(encoder, _entries(image_root), **{**spec, "fingerprint": "vae-b", "flip": True})
    assert encoder.images == 10  # flipped latents were missing


def test_skip_cache_check_uses_the_disk_entries_as_they_are(image_root):
    """sd-scripts' --skip_cache_check: a disk entry of the right shape is used even after the image or the VAE
    changed (what the user asks for to start faster); without it both re-encode (test above)."""
    _filled(CountingEncoder(), _entries(image_root), to_disk=True, fingerprint="vae-a")
    changed = image_root / "3_thing" / "im2.png"
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    encoder = CountingEncoder()
    _, report = _filled(encoder, _entries(image_root), to_disk=True, fingerprint="vae-b", trust_disk=True)
    assert (report.encoded, report.reused, encoder.images) == (0, 5, 0)


def test_a_file_keeps_entries_for_other_bucket_sizes(image_root):
    _filled(CountingEncoder(), _entries(image_root), to_disk=True)
    _filled(CountingEncoder(), _entries(image_root, max_resolution="128", max_bucket_reso=256), to_disk=True)
    with np.load(image_root / "3_thing" / "im0_0064x0064_sd.npz") as data:
        assert "latents_8x8" in data.files and "latents_16x16" in data.files
    encoder = CountingEncoder()
    _filled(encoder, _entries(image_root), to_disk=True)
    assert encoder.images == 0


def test_dataset_trains_from_cached_latents_without_encoding(image_root):
    settings = _settings(image_root)
    plan = plan_steps(settings)
    encoder = CountingEncoder()
    cache, _ = _filled(encoder, plan.entries, flip=True)
    encoded_before = encoder.images
    dataset = TrainingDataset(plan.entries, DatasetConfig.from_settings(settings), latents=cache)
    batches = list(dataset.iter_epoch(1))
    assert encoder.images == encoded_before
    assert sum(len(b) for b in batches) == 15
    for batch in batches:
        assert batch.images is None
        width, height = batch.bucket
        assert batch.latents.shape == (len(batch), 3, height // 8, width // 8)
    assert any(f for b in batches for f in b.flipped)


def test_nan_latents_name_the_image(image_root):
    entries = _entries(image_root)
    cache = LatentCache(CacheSpec(lambda pixels, generators: F.avg_pool2d(pixels, 8) * float("nan")))
    cache.prepare(entries)  # encodes nothing: the NaN shows at the first use
    with pytest.raises(LatentCacheError, match=r"im1\.png.*NaN.*no_half_vae"):
        cache.get(entries[1], flipped=False)
    with pytest.raises(LatentCacheError, match=r"im\d\.png.*NaN"):
        cache.encode_missing()


def test_missing_flipped_latents_are_a_clear_error(image_root):
    entries = _entries(image_root)
    cache, _ = _filled(CountingEncoder(), entries, flip=False)
    with pytest.raises(LatentCacheError, match="flip"):
        cache.get(entries[0], flipped=True)


def test_caching_blockers():
    assert latent_caching_blockers(SimpleNamespace(color_aug=False, random_crop=False)) == []
    reasons = latent_caching_blockers(SimpleNamespace(color_aug=True, random_crop=True))
    assert len(reasons) == 2 and "color_aug" in reasons[0] and "random_crop" in reasons[1]
