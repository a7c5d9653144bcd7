"""Latents encoded on first use: once per entry, independent of the order, thread-safe, bad images, a real run."""
from __future__ import annotations

import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.data.dataset import DatasetConfig, TrainingDataset
from trainer.data.images import BadImageError
from trainer.data.latent_cache import CacheSpec, LatentCache, entry_seed
from trainer.data.plan import plan_steps

from test_data_latent_cache import _entries, _settings, write_images  # the dataset settings those tests use

SIZES = [(64, 64), (96, 48), (48, 96), (64, 64), (80, 40), (64, 64)]


class NoisyEncoder:
    """Stands in for a VAE: 8x8 average pooling plus noise drawn from each row's generator, as
    ``latent_dist.sample(generator=[...])`` does. Counts the images it sees, per image content."""

    def __init__(self, delay: float = 0.0):
        self.images = 0
        self.calls: list[int] = []
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        assert len(generators) == pixels.shape[0]
        with self._lock:
            self.images += pixels.shape[0]
            self.calls.append(pixels.shape[0])
        time.sleep(self.delay)
        mean = F.avg_pool2d(pixels, 8)
        noise = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g) for g in generators])
        return mean + 0.1 * noise


@pytest.fixture()
def image_root(tmp_path) -> Path:
    return write_images(tmp_path, "2_thing", SIZES, red_step=40)


def _cache(entries, encoder, **spec) -> LatentCache:
    cache = LatentCache(CacheSpec(encoder, **{"flip": True, "seed": 7, **spec}))
    cache.prepare(entries)
    return cache


def _latents(cache, entries, order, flipped=False) -> dict[Path, torch.Tensor]:
    return {entries[i].item.path: cache.get(entries[i], flipped).latents for i in order}


# -- once, and only when used ---------------------------------------------------------------------------
def test_each_entry_is_encoded_once_on_first_use_across_two_epochs(image_root):
    settings = _settings(image_root)
    plan = plan_steps(settings)
    encoder = NoisyEncoder()
    cache = _cache(plan.entries, encoder)
    dataset = TrainingDataset(plan.entries, DatasetConfig.from_settings(settings), latents=cache)
    assert encoder.images == 0 and cache.report.pending == len(SIZES)  # nothing before the first get

    epoch = dataset.iter_epoch(1)
    first = next(epoch)
    assert encoder.images == 2 * len(set(first.paths))  # its own images (plain + flipped), nothing else
    rest = list(epoch)
    assert encoder.images == 2 * len(SIZES) and cache.complete  # every image once, both sides
    assert sum(len(b) for b in [first, *rest]) == 2 * len(SIZES)  # repeats 2: each image used twice
    second = list(dataset.iter_epoch(2))
    assert encoder.images == 2 * len(SIZES)  # epoch 2 only reuses
    assert all(b.latents is not None and b.images is None for b in second)
    report = cache.finish()
    assert (report.encoded, report.reused, report.pending, report.failed) == (len(SIZES), 0, 0, [])


# -- the same latents whatever the order ------------------------------------------------------------------
def test_latents_do_not_depend_on_the_encoding_order(image_root):
    entries = _entries(image_root)
    forward = list(range(len(entries)))
    backward = forward[::-1]
    shuffled = [3, 0, 5, 1, 4, 2]
    a = _latents(_cache(entries, NoisyEncoder()), entries, forward)
    b = _latents(_cache(entries, NoisyEncoder()), entries, backward)
    c = _latents(_cache(entries, NoisyEncoder(), batch_size=3), entries, shuffled)  # encoded in chunks
    up_front = _cache(entries, NoisyEncoder())
    up_front.encode_missing()
    d = _latents(up_front, entries, shuffled)
    for i, entry in enumerate(entries):
        alone = _cache([entry], NoisyEncoder()).get(entry, False).latents  # a fresh cache, just this entry
        path = entry.item.path
        assert torch.equal(a[path], b[path]) and torch.equal(a[path], d[path]) and torch.equal(a[path], alone)
        torch.testing.assert_close(c[path], a[path], rtol=0, atol=1e-6)  # a batch of 3 may round differently
    other_seed = _latents(_cache(entries, NoisyEncoder(), seed=8), entries, [1])
    assert not torch.equal(other_seed[entries[1].item.path], a[entries[1].item.path])  # the run seed counts


def test_flipped_latents_differ_and_do_not_depend_on_the_order(image_root):
    entries = _entries(image_root)
    a = _latents(_cache(entries, NoisyEncoder()), entries, range(len(entries)), flipped=True)
    b = _latents(_cache(entries, NoisyEncoder()), entries, reversed(range(len(entries))), flipped=True)
    plain = _latents(_cache(entries, NoisyEncoder()), entries, range(len(entries)))
    for entry in entries:
        path = entry.item.path
        assert torch.equal(a[path], b[path])
        mirrored = torch.flip(plain[path], dims=[2])
        assert (a[path] - mirrored).abs().max() > 0.05  # its own noise, not the mirror of the plain sample


def test_entry_seed_is_stable_and_tells_entries_apart():
    base = entry_seed(42, "/data/2_x/a.png", (64, 64), False)
    if os.name == "posix":  # a fixed value: a salted hash() would change it in every process
        assert base == entry_seed(42, Path("/data/2_x/a.png"), (64, 64), False) == 4579756189827453054
    others = {entry_seed(43, "/data/2_x/a.png", (64, 64), False), entry_seed(42, "/data/2_x/b.png", (64, 64), False),
              entry_seed(42, "/data/2_x/a.png", (64, 48), False), entry_seed(42, "/data/2_x/a.png", (64, 64), True)}
    assert base not in others and len(others) == 4


@pytest.mark.parametrize("family_path", ["trainer.families.sd:StableDiffusionFamily", "trainer.families.sdxl:SDXLFamily"])
def test_family_encode_images_draws_each_rows_noise_from_its_own_generator(family_path):
    import importlib

    from trainer.devtools.tiny_specs import TINY_VAE
    from trainer.models.vae import AutoencoderKL

    module, name = family_path.split(":")
    family = object.__new__(getattr(importlib.import_module(module), name))  # encode_images needs only .vae
    torch.manual_seed(0)
    family.vae = AutoencoderKL.from_config(TINY_VAE).eval()
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1

    def generator(seed):
        return torch.Generator().manual_seed(seed)

    both = family.encode_images(pixels, [generator(1), generator(2)])
    first = family.encode_images(pixels[:1], [generator(1)])
    second = family.encode_images(pixels[1:], generator(2))
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=0, atol=1e-5)
    assert not torch.allclose(family.encode_images(pixels[:1], [generator(3)]), first)


# -- disk ----------------------------------------------------------------------------------------------------
def test_latents_encoded_on_demand_are_written_and_read_by_the_next_cache(image_root):
    settings = _settings(image_root)
    plan = plan_steps(settings)
    first = _cache(plan.entries, NoisyEncoder(), to_disk=True, fingerprint="vae")
    dataset = TrainingDataset(plan.entries, DatasetConfig.from_settings(settings), latents=first)
    list(dataset.iter_epoch(1))
    assert len(list(image_root.rglob("*_sd.npz"))) == len(SIZES)

    encoder = NoisyEncoder()
    second = LatentCache(CacheSpec(encoder, flip=True, seed=7, to_disk=True, fingerprint="vae"))
    report = second.prepare(plan.entries)
    assert (report.encoded, report.reused, report.pending) == (0, len(SIZES), 0) and second.complete
    for entry in plan.entries:
        for flipped in (False, True):
            assert torch.equal(second.get(entry, flipped).latents, first.get(entry, flipped).latents)
    assert encoder.images == 0


# -- bad images ----------------------------------------------------------------------------------------------
def _with_bad_image(root: Path) -> list:
    folder = root / "2_x"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (60 * i, 0, 0)).save(folder / f"ok{i}.png")
    Image.new("RGB", (64, 64)).save(folder / "bad.png")
    entries = _entries(root, flip_aug=False)
    (folder / "bad.png").write_bytes((folder / "bad.png").read_bytes()[:60])  # truncated after the scan
    return entries


def test_a_bad_image_found_on_demand_is_reported_once_and_skipped(tmp_path):
    entries = _with_bad_image(tmp_path)
    settings = _settings(tmp_path, flip_aug=False)
    encoder = NoisyEncoder()
    cache = _cache(entries, encoder, flip=False, batch_size=4)  # one chunk: the good images still get encoded
    reported: list[BadImageError] = []
    dataset = TrainingDataset(entries, DatasetConfig.from_settings(settings), latents=cache,
                              on_bad_image=reported.append)
    batches = list(dataset.iter_epoch(1)) + list(dataset.iter_epoch(2))
    assert [e.path.name for e in reported] == ["bad.png"]  # once, although used twice an epoch, two epochs
    assert Counter(p.name for b in batches for p in b.paths) == {"ok0.png": 4, "ok1.png": 4, "ok2.png": 4}
    assert encoder.images == 3 and cache.complete
    assert [e.path.name for e in cache.report.failed] == ["bad.png"]


def test_a_bad_image_found_on_demand_stops_a_strict_run(tmp_path):
    entries = _with_bad_image(tmp_path)
    config = DatasetConfig.from_settings(_settings(tmp_path, flip_aug=False), skip_bad_images=False)
    dataset = TrainingDataset(entries, config, latents=_cache(entries, NoisyEncoder(), flip=False))
    with pytest.raises(BadImageError) as raised:
        list(dataset.iter_epoch(1))
    assert raised.value.path.name == "bad.png"


# -- threads -------------------------------------------------------------------------------------------------
def test_threads_asking_for_one_entry_encode_it_once(image_root):
    entries = _entries(image_root)
    encoder = NoisyEncoder(delay=0.2)
    cache = _cache(entries, encoder)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(entries[2], False).latents)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 4 and all(torch.equal(r, results[0]) for r in results)
    assert encoder.calls == [1, 1]  # plain + flipped, once


def test_worker_threads_give_the_same_batches_and_encode_once(image_root):
    plain, threaded = NoisyEncoder(), NoisyEncoder()
    entries = plan_steps(_settings(image_root)).entries
    one = TrainingDataset(entries, DatasetConfig.from_settings(_settings(image_root)), latents=_cache(entries, plain))
    many = TrainingDataset(entries, DatasetConfig.from_settings(_settings(image_root, max_data_loader_n_workers=3)),
                           latents=_cache(entries, threaded))
    for a, b in zip(one.iter_epoch(1), many.iter_epoch(1), strict=True):
        assert a.paths == b.paths and a.flipped == b.flipped and torch.equal(a.latents, b.latents)
    assert plain.images == threaded.images == 2 * len(SIZES)


def test_exclusive_keeps_encoders_out(image_root):
    entries = _entries(image_root)
    encoder = NoisyEncoder()
    cache = _cache(entries, encoder)
    worker = threading.Thread(target=cache.get, args=(entries[0], False))
    with cache.exclusive():  # what the loop holds while a step may sample with the VAE
        worker.start()
        worker.join(0.3)
        assert worker.is_alive() and encoder.images == 0
    worker.join(10)
    assert encoder.images == 2


# -- a training run --------------------------------------------------------------------------------------------
@pytest.fixture()
def three_images(tmp_path):
    from trainer.devtools.synthetic import make_image_folder

    return make_image_folder(tmp_path / "img", {"1_sks dog": 3}, sizes=[(64, 64)], seed=5)


def _run(model, images, out, monkeypatch, stop_at: int = 0, **overrides):
    """Train on the tiny model (stopping after step ``stop_at`` if given); a timeline of Step numbers,
    Log lines, VAE encodes and VAE releases."""
    from test_train import tiny_settings
    from trainer import events as ev
    from trainer.control import Control
    from trainer.families.sd import StableDiffusionFamily
    from trainer.loop import train

    timeline: list[tuple] = []
    encode, release = StableDiffusionFamily.encode_images, StableDiffusionFamily.release_vae

    def counting_encode(self, pixels, generator=None):
        timeline.append(("encode", pixels.shape[0]))
        return encode(self, pixels, generator)

    def recorded_release(self):
        timeline.append(("release",))
        return release(self)

    monkeypatch.setattr(StableDiffusionFamily, "encode_images", counting_encode)
    monkeypatch.setattr(StableDiffusionFamily, "release_vae", recorded_release)

    control = Control()

    def sink(event):
        if isinstance(event, ev.Step):
            timeline.append(("step", event.step))
            if event.step == stop_at:
                control.request_stop()
        elif isinstance(event, ev.Log):
            timeline.append(("log", event.message))

    result = train(tiny_settings(model, images, out, **overrides), sink, control)
    assert result.status == ("stopped" if stop_at else "finished"), result.error
    return timeline


def _encoded_before(timeline, marker) -> int:
    return sum(item[1] for item in timeline[: timeline.index(marker)] if item[0] == "encode")


def _log_index(timeline, text) -> int:
    (index,) = [i for i, item in enumerate(timeline) if item[0] == "log" and text in item[1]]
    return index


@pytest.mark.slow
def test_a_run_steps_after_its_first_batch_is_encoded_and_frees_the_vae_after_epoch_1(
        tiny_sd1_dir, three_images, tmp_path, monkeypatch):
    timeline = _run(tiny_sd1_dir, three_images, tmp_path / "out", monkeypatch, epoch=2)
    assert [item[1] for item in timeline if item[0] == "step"] == list(range(1, 7))
    assert _encoded_before(timeline, ("step", 1)) == 1  # the first batch's one image, not all three
    assert _log_index(timeline, "encoded as each image is first used") < timeline.index(("step", 1))
    assert _encoded_before(timeline, ("step", 4)) == 3  # epoch 1 encoded each image once; epoch 2 none
    assert sum(item[1] for item in timeline if item[0] == "encode") == 3
    cached = _log_index(timeline, "latents cached: 3 encoded, 0 read from disk")
    assert timeline.index(("step", 3)) < cached < timeline.index(("release",)) < timeline.index(("step", 4))
    assert timeline.count(("release",)) == 1


@pytest.mark.slow
def test_a_second_run_reads_every_latent_from_disk_and_frees_the_vae_before_step_1(
        tiny_sd1_dir, three_images, tmp_path, monkeypatch):
    images = tmp_path / "copy"
    shutil.copytree(three_images, images)
    _run(tiny_sd1_dir, images, tmp_path / "a", monkeypatch, cache_latents_to_disk=True, flip_aug=True)
    assert len(list(images.rglob("*_sd.npz"))) == 3
    timeline = _run(tiny_sd1_dir, images, tmp_path / "b", monkeypatch, cache_latents_to_disk=True, flip_aug=True)
    assert not [item for item in timeline if item[0] == "encode"]
    assert _log_index(timeline, "latents cached: 0 encoded, 3 read from disk") < timeline.index(("release",))
    assert timeline.index(("release",)) < timeline.index(("step", 1)) and timeline.count(("release",)) == 1
    assert not [item for item in timeline if item[0] == "log" and "first used" in item[1]]


@pytest.mark.slow
def test_a_resumed_run_encodes_the_skipped_images_after_its_first_epoch_and_matches_a_straight_run(
        tiny_sd1_dir, three_images, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    common = dict(epoch=3, flip_aug=True, noise_offset=0.05)
    _run(tiny_sd1_dir, three_images, tmp_path / "straight", monkeypatch, **common)
    _run(tiny_sd1_dir, three_images, tmp_path / "stopped", monkeypatch, stop_at=4, save_state=True, **common)
    state = tmp_path / "stopped" / "tiny-step00000004-state"
    timeline = _run(tiny_sd1_dir, three_images, tmp_path / "resumed", monkeypatch, resume=str(state), **common)
    assert [item[1] for item in timeline if item[0] == "step"] == [5, 6, 7, 8, 9]
    # epoch 2 resumes at its batch 1: two images used (plain + flipped each), the third encoded when it ends
    assert _encoded_before(timeline, ("step", 6)) == 2 * 2
    assert _encoded_before(timeline, ("step", 7)) == 3 * 2
    cached = _log_index(timeline, "latents cached: 3 encoded, 0 read from disk")
    assert timeline.index(("step", 6)) < cached < timeline.index(("release",)) < timeline.index(("step", 7))
    straight = load_file(str(tmp_path / "straight" / "tiny.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "tiny.safetensors"))
    assert set(straight) == set(resumed)
    for key in straight:  # the same latents although encoded in another order, by another process
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_speed_and_eta_leave_out_first_use_encoding_and_count_what_is_left(
        tiny_sd1_dir, three_images, tmp_path, monkeypatch):
    """Epoch 1 encodes images as it goes: the it/s shown is the training speed, and the ETA adds the encoding
    still to come instead of extrapolating epoch 1's slower steps over the whole run."""
    import time

    from test_train import tiny_settings
    from trainer import events as ev
    from trainer.families.sd import StableDiffusionFamily
    from trainer.loop import train

    slow_s = 0.4
    encode = StableDiffusionFamily.encode_images

    def slow_encode(self, pixels, generator=None):
        time.sleep(slow_s * pixels.shape[0])
        return encode(self, pixels, generator)

    monkeypatch.setattr(StableDiffusionFamily, "encode_images", slow_encode)
    steps: list[ev.Step] = []
    result = train(tiny_settings(tiny_sd1_dir, three_images, tmp_path / "out", epoch=2),
                   lambda e: steps.append(e) if isinstance(e, ev.Step) else None)
    assert result.status == "finished", result.error
    assert len(steps) == 6
    # Step 1 is timed from the start of training (its window holds one step) and its image's encode took at
    # least 0.4 s: the step time behind it/s is the elapsed time less that encode (clock-independent checks,
    # so a loaded machine cannot make them flaky)
    assert steps[0].elapsed_s - 1 / steps[0].it_per_s >= slow_s * 0.99
    # after step 1, two images are still to encode: the ETA is the 5 steps left at that speed plus >= 2 x 0.4 s
    assert steps[0].eta_s - 5 / steps[0].it_per_s >= 2 * slow_s * 0.99
    # after epoch 1 nothing is left to encode: the ETA is the steps left at the current speed, nothing more
    assert steps[3].eta_s == pytest.approx(2 / steps[3].it_per_s, rel=1e-6)
