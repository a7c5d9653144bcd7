"""Latent caching through an injected ``encode(pixels) -> latents`` (the VAE lives elsewhere).

Each distinct (image, bucket) is encoded once before training, in batches of
``batch_size`` images of one bucket; with flip augmentation the mirrored image is
encoded too (a flipped latent is not the mirror of a latent). Latents are kept in
memory, and with ``to_disk`` also written next to the image the way sd-scripts does:
``<stem>_<W:04d>x<H:04d>_<suffix>.npz`` with keys ``latents_<h>x<w>``,
``original_size_<h>x<w>``, ``crop_ltrb_<h>x<w>`` and ``latents_flipped_<h>x<w>``
(h x w: latent size; W x H: image size). A file holds one entry per bucket size.

sd-scripts only checks the latent shape, so a cache silently outlives an edited
image or a different VAE. Each entry here also stores the image's modification time
and byte size and a fingerprint of the encoder settings; any change re-encodes it.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from trainer.data.buckets import Size, crop_offsets
from trainer.data.dataset import CachedLatents
from trainer.data.images import BadImageError, prepare_image, to_tensor
from trainer.data.samples import Entry

CACHE_FORMAT_VERSION = "nekoya-latents-1"  # bump when the image pipeline changes what gets encoded

Encoder = Callable[[torch.Tensor], torch.Tensor]


class LatentCacheError(RuntimeError):
    """Caching failed (NaN latents, missing flipped latents, ...); the message names the image."""


def latent_caching_blockers(settings: Any) -> list[str]:
    """Why latents cannot be cached with these settings (empty when they can), as sd-scripts asserts."""
    reasons = {
        "color_aug": "color_aug changes the pixels every time an image is used, so its latents cannot be cached",
        "random_crop": "random_crop picks a new crop every time an image is used, so its latents cannot be cached",
    }
    return [reason for key, reason in reasons.items() if getattr(settings, key, False)]


@dataclass(frozen=True)
class CacheSpec:
    """How to cache. ``encode`` receives CPU float32 pixels (B, 3, H, W) in [-1, 1], moves them to its
    own device and dtype, and returns the unscaled latents (B, C, H/8, W/8), e.g. ``latent_dist.sample()``."""

    encode: Encoder
    to_disk: bool = False
    flip: bool = False  # also cache mirrored latents (flip_aug)
    batch_size: int = 1  # vae_batch_size
    suffix: str = "sd"  # file name suffix per model family: "sd", "sdxl"
    fingerprint: str = ""  # encoder identity (VAE file, dtype...): a change re-encodes
    downscale: int = 8  # pixels per latent cell
    keep_in_memory: bool = True  # False with to_disk: read the file at every use


@dataclass
class CacheReport:
    encoded: int = 0  # (image, bucket) pairs encoded now
    reused: int = 0  # pairs read back from disk
    failed: list[BadImageError] = field(default_factory=list)


@dataclass(frozen=True)
class _Record:
    latents: torch.Tensor
    flipped: torch.Tensor | None
    original_size: Size
    crop_left_top: Size


class LatentCache:
    """Latents for every entry of a dataset; pass it to ``TrainingDataset(latents=...)`` after ``prepare``."""

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self._records: dict[tuple[Path, Size], _Record] = {}
        self._failed: dict[Path, BadImageError] = {}

    def prepare(self, entries: Sequence[Entry], progress: Callable[[int, int], None] | None = None) -> CacheReport:
        """Load valid disk entries and encode the rest. Bad images are collected in the report, not raised."""
        report = CacheReport()
        todo: list[Entry] = []
        for entry in _unique(entries):
            record = self._read_disk(entry) if self.spec.to_disk else None
            if record is not None:
                self._remember(entry, record)
                report.reused += 1
            elif _key(entry) not in self._records:
                todo.append(entry)
        todo.sort(key=lambda e: e.choice.bucket)
        for group in _batches_by_bucket(todo, self.spec.batch_size):
            report.encoded += self._encode_group(group, report)
            if progress is not None:
                progress(report.encoded + len(report.failed), len(todo))
        return report

    def get(self, entry: Entry, flipped: bool) -> CachedLatents:
        if entry.item.path in self._failed:
            raise self._failed[entry.item.path]
        record = self._records.get(_key(entry))
        if record is None and self.spec.to_disk and not self.spec.keep_in_memory:
            record = self._read_disk(entry)
        if record is None:
            raise LatentCacheError(
                f"{entry.item.path}: no cached latents for bucket {entry.choice.bucket}; call prepare() first"
            )
        if not flipped:
            return CachedLatents(record.latents, record.original_size, record.crop_left_top)
        if record.flipped is None:
            raise LatentCacheError(f"{entry.item.path}: flip_aug needs flipped latents; build the cache with flip=True")
        left, top = record.crop_left_top
        mirrored_left = entry.choice.resized[0] - left - entry.choice.bucket[0]
        return CachedLatents(record.flipped, record.original_size, (mirrored_left, top))

    def npz_path(self, entry: Entry) -> Path:
        item = entry.item
        return item.path.with_name(f"{item.path.stem}_{item.width:04d}x{item.height:04d}_{self.spec.suffix}.npz")

    def _remember(self, entry: Entry, record: _Record) -> None:
        if self.spec.keep_in_memory or not self.spec.to_disk:
            self._records[_key(entry)] = record

    def _encode_group(self, group: list[Entry], report: CacheReport) -> int:
        prepared, ok = [], []
        for entry in group:
            try:
                prepared.append(prepare_image(entry.item.path, entry.choice))
                ok.append(entry)
            except BadImageError as error:
                self._failed[entry.item.path] = error
                report.failed.append(error)
        if not ok:
            return 0
        pixels = to_tensor([p.pixels for p in prepared])
        latents = self._run_encoder(pixels, ok)
        flipped = self._run_encoder(torch.flip(pixels, dims=[3]), ok) if self.spec.flip else [None] * len(ok)
        for entry, image, lat, lat_flipped in zip(ok, prepared, latents, flipped):
            record = _Record(lat, lat_flipped, image.original_size, image.crop_left_top)
            self._remember(entry, record)
            if self.spec.to_disk:
                self._write_disk(entry, record)
        return len(ok)

    def _run_encoder(self, pixels: torch.Tensor, entries: list[Entry]) -> list[torch.Tensor]:
        with torch.no_grad():
            latents = self.spec.encode(pixels).detach().float().cpu()
        height, width = self._latent_size(entries[0])
        if latents.dim() != 4 or tuple(latents.shape[i] for i in (0, 2, 3)) != (len(entries), height, width):
            expected = f"({len(entries)}, C, {height}, {width})"
            raise LatentCacheError(f"encoder returned shape {tuple(latents.shape)}, expected {expected}")
        for entry, latent in zip(entries, latents):
            if not torch.isfinite(latent).all():
                raise LatentCacheError(
                    f"{entry.item.path}: the VAE produced NaN/inf latents (try an fp32 VAE: no_half_vae)"
                )
        return list(latents)

    def _latent_size(self, entry: Entry) -> tuple[int, int]:
        """(height, width) of the latents of an entry's bucket."""
        return entry.choice.bucket[1] // self.spec.downscale, entry.choice.bucket[0] // self.spec.downscale

    def _fingerprint(self) -> str:
        return f"{CACHE_FORMAT_VERSION}|{self.spec.fingerprint}"

    def _write_disk(self, entry: Entry, record: _Record) -> None:
        path = self.npz_path(entry)
        suffix = _reso_suffix(record.latents)
        arrays = _read_npz(path)  # keep the entries of other bucket sizes
        stat = entry.item.path.stat()
        left, top = record.crop_left_top
        width, height = entry.choice.bucket
        arrays.update({
            f"latents_{suffix}": record.latents.numpy(),
            f"original_size_{suffix}": np.array(record.original_size),
            f"crop_ltrb_{suffix}": np.array((left, top, left + width, top + height)),
            f"nekoya_source_{suffix}": np.array((stat.st_mtime_ns, stat.st_size), dtype=np.int64),
            f"nekoya_fingerprint_{suffix}": np.array(self._fingerprint()),
        })
        arrays.pop(f"latents_flipped_{suffix}", None)
        if record.flipped is not None:
            arrays[f"latents_flipped_{suffix}"] = record.flipped.numpy()
        _write_npz_atomically(path, arrays)

    def _read_disk(self, entry: Entry) -> _Record | None:
        """The cached record if it matches the image file, the bucket and the encoder; else None."""
        latent_h, latent_w = self._latent_size(entry)
        suffix = f"{latent_h}x{latent_w}"
        arrays = _read_npz(self.npz_path(entry))
        try:
            stat = entry.item.path.stat()
        except OSError:
            return None
        wanted = [f"latents_{suffix}", f"original_size_{suffix}", f"crop_ltrb_{suffix}", f"nekoya_source_{suffix}"]
        if self.spec.flip:
            wanted.append(f"latents_flipped_{suffix}")
        if any(key not in arrays for key in wanted):
            return None
        if tuple(arrays[f"nekoya_source_{suffix}"].tolist()) != (stat.st_mtime_ns, stat.st_size):
            return None
        if str(arrays.get(f"nekoya_fingerprint_{suffix}", "")) != self._fingerprint():
            return None
        latents = torch.from_numpy(arrays[f"latents_{suffix}"])
        if tuple(latents.shape[1:]) != (latent_h, latent_w):
            return None
        flipped = arrays.get(f"latents_flipped_{suffix}") if self.spec.flip else None
        left, top = (int(v) for v in arrays[f"crop_ltrb_{suffix}"][:2])
        original = tuple(int(v) for v in arrays[f"original_size_{suffix}"])
        return _Record(latents, torch.from_numpy(flipped) if flipped is not None else None, original, (left, top))


def _key(entry: Entry) -> tuple[Path, Size]:
    return entry.item.path, entry.choice.bucket


def _unique(entries: Sequence[Entry]) -> list[Entry]:
    seen: dict[tuple[Path, Size], Entry] = {}
    for entry in entries:
        seen.setdefault(_key(entry), entry)
    return list(seen.values())


def _batches_by_bucket(entries: list[Entry], batch_size: int) -> list[list[Entry]]:
    batches: list[list[Entry]] = []
    for entry in entries:
        if batches and batches[-1][0].choice.bucket == entry.choice.bucket and len(batches[-1]) < max(1, batch_size):
            batches[-1].append(entry)
        else:
            batches.append([entry])
    return batches


def _reso_suffix(latents: torch.Tensor) -> str:
    return f"{latents.shape[1]}x{latents.shape[2]}"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError):
        return {}  # a damaged cache file is rebuilt


def _write_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as temp:
            np.savez(temp, **arrays)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
