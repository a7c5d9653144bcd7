"""Latent caching through an injected ``encode(pixels, generators) -> latents`` (the VAE lives elsewhere).

Each distinct (image, bucket) is encoded when it is first used (``get``), not before
training: the first step comes as soon as its own batch is encoded, and a setting that
fails at the first step fails in seconds. Once encoded, a latent is kept and reused by
every later use (and, with ``to_disk``, by later runs). ``prepare`` only registers the
dataset's entries and reads the valid disk entries; ``encode_missing`` encodes what is
left (a resumed run's skipped batches, or everything up front when a caller wants that).

Registered entries missing from disk are split once into encoding chunks: ``batch_size``
images of one bucket, in the dataset's order sorted by bucket (what up-front caching
encoded together). A first use encodes the missing members of its entry's chunk, so the
VAE always sees the same batches whatever order the entries are asked for in. With flip
augmentation the mirrored image is encoded too (a flipped latent is not the mirror of a
latent).

Latents do not depend on encoding order: the VAE's sampling noise comes from one
generator per (run seed, image path, bucket, flipped), seeded through SHA-256
(``entry_seed``), so an entry gets the same latents encoded up front, on demand, in
another epoch order or after a resume.

``get`` may run on data-loader worker threads while the main thread trains: encoding
and storing happen under one lock (no entry is encoded twice), and ``exclusive()``
lets another user of the VAE (sampling) keep encoders out meanwhile.

Latents are kept in memory, and with ``to_disk`` also written next to the image the way
sd-scripts does: ``<stem>_<W:04d>x<H:04d>_<suffix>.npz`` with keys ``latents_<h>x<w>``,
``original_size_<h>x<w>``, ``crop_ltrb_<h>x<w>`` and ``latents_flipped_<h>x<w>``
(h x w: latent size; W x H: image size). A file holds one entry per bucket size.

sd-scripts only checks the latent shape, so a cache silently outlives an edited
image or a different VAE. Each entry here also stores the image's modification time
and byte size and a fingerprint of the encoder settings; any change re-encodes it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from trainer.data.buckets import Size
from trainer.data.dataset import CachedLatents
from trainer.data.images import BadImageError, prepare_image, to_tensor
from trainer.data.samples import Entry
from trainer.problems import NekoyaError

CACHE_FORMAT_VERSION = "nekoya-latents-1"  # bump when the image pipeline changes what gets encoded

# (pixels (B, 3, H, W), one generator per row) -> unscaled latents (B, C, H/8, W/8)
Encoder = Callable[[torch.Tensor, list[torch.Generator]], torch.Tensor]
Progress = Callable[[int, int], None]  # (images encoded or failed so far, images to encode)
Key = tuple[Path, Size]


class LatentCacheError(NekoyaError, RuntimeError):
    """Caching failed (NaN latents, missing flipped latents, ...); the message names the image."""


def latent_caching_blockers(settings: Any) -> list[str]:
    """Why latents cannot be cached with these settings (empty when they can), as sd-scripts asserts."""
    reasons = {
        "color_aug": "color_aug changes the pixels every time an image is used, so its latents cannot be cached",
        "random_crop": "random_crop picks a new crop every time an image is used, so its latents cannot be cached",
    }
    return [reason for key, reason in reasons.items() if getattr(settings, key, False)]


def entry_seed(seed: int, path: Path | str, bucket: Size, flipped: bool) -> int:
    """The seed of one image's VAE sampling noise: a SHA-256 of (run seed, absolute path, bucket, flipped).

    Stable across processes and machines (unlike ``hash()``, salted per process) and independent of
    the order images are encoded in.
    """
    text = f"{int(seed)}|{os.path.abspath(path)}|{bucket[0]}x{bucket[1]}|{'flipped' if flipped else 'plain'}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class CacheSpec:
    """How to cache. ``encode`` receives CPU float32 pixels (B, 3, H, W) in [-1, 1] and one CPU
    ``torch.Generator`` per row, moves the pixels to its own device and dtype, and returns the unscaled
    latents (B, C, H/8, W/8), e.g. ``latent_dist.sample(generator=generators)``."""

    encode: Encoder
    to_disk: bool = False
    flip: bool = False  # also cache mirrored latents (flip_aug)
    batch_size: int = 1  # vae_batch_size
    suffix: str = "sd"  # file name suffix per model family (its adapter's cache_suffix)
    fingerprint: str = ""  # encoder identity (VAE file, dtype...): a change re-encodes
    downscale: int = 8  # pixels per latent cell
    keep_in_memory: bool = True  # False with to_disk: read the file at every use
    seed: int = 0  # the run seed: with each image's path, bucket and flip, it seeds that image's sampling noise
    trust_disk: bool = False  # skip_cache_check: a disk entry of the right shape is used as sd-scripts does, even if
    # the image or the encoder changed since it was written


@dataclass
class CacheReport:
    encoded: int = 0  # (image, bucket) pairs encoded so far
    reused: int = 0  # pairs read back from disk
    failed: list[BadImageError] = field(default_factory=list)
    pending: int = 0  # registered pairs not encoded yet (encoded on first use)
    seconds: float = 0.0  # time spent encoding so far (all threads)

    def seconds_left(self) -> float:
        """The encoding still to come, at the mean time per image so far (0 before the first encode)."""
        return self.pending * self.seconds / self.encoded if self.encoded else 0.0


@dataclass(frozen=True)
class _Record:
    latents: torch.Tensor
    flipped: torch.Tensor | None
    original_size: Size
    crop_left_top: Size


class LatentCache:
    """Latents for the entries of a dataset, encoded on first use; pass it to ``TrainingDataset(latents=...)``.

    ``prepare`` registers the entries (and reads the disk cache) so the cache knows its chunks and when
    it is ``complete``; ``get`` works for any entry. Thread-safe.
    """

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self.finished = False  # set by finish(): the caller has taken the totals (and freed the VAE)
        self._records: dict[Key, _Record] = {}
        self._done: set[Key] = set()  # encoded or read from disk (also when not kept in memory)
        self._failed: dict[Path, BadImageError] = {}
        self._chunks: list[list[Entry]] = []  # registered entries to encode, in encoding batches
        self._chunk_of: dict[Key, list[Entry]] = {}
        self._missing: set[Key] = set()  # registered, neither encoded nor failed yet
        self._report = CacheReport()
        self._to_encode = 0  # registered entries that were not on disk: the progress total
        self._progress: Progress | None = None
        self._lock = threading.RLock()

    # -- the dataset's side ---------------------------------------------------------------------------
    def prepare(self, entries: Sequence[Entry], progress: Progress | None = None) -> CacheReport:
        """Register ``entries``: read their valid disk entries now (cheap), plan the encoding of the rest.

        Nothing is encoded here. ``progress(done, total)`` is called from whichever thread encodes.
        """
        with self._lock:
            self._progress = progress or self._progress
            todo: list[Entry] = []
            for entry in _unique(entries):
                key = _key(entry)
                if key in self._done or key in self._chunk_of:
                    continue
                record = self._read_disk(entry) if self.spec.to_disk else None
                if record is not None:
                    self._store(entry, record)
                    self._report.reused += 1
                else:
                    todo.append(entry)
            todo.sort(key=lambda e: e.choice.bucket)
            for chunk in _batches_by_bucket(todo, self.spec.batch_size):
                self._chunks.append(chunk)
                self._chunk_of.update((_key(e), chunk) for e in chunk)
            self._missing.update(_key(e) for e in todo)
            self._to_encode += len(todo)
            return self.report

    def get(self, entry: Entry, flipped: bool) -> CachedLatents:
        """The entry's latents, encoding them (with its chunk) on first use. Raises the image's
        ``BadImageError`` when it cannot be loaded, ``LatentCacheError`` on NaN latents."""
        record = self._lookup(entry)
        if record is None:
            with self._lock:  # checked again under the lock: another thread may have just encoded it
                record = self._lookup(entry) or self._encode_for(entry)
        return self._view(entry, record, flipped)

    # -- the training loop's side -----------------------------------------------------------------
    @property
    def report(self) -> CacheReport:
        """The totals so far (a copy)."""
        with self._lock:
            r = self._report
            return CacheReport(r.encoded, r.reused, list(r.failed), len(self._missing), r.seconds)

    @property
    def complete(self) -> bool:
        """Every registered entry is cached (or its image failed): the encoder is not needed any more."""
        return not self._missing

    def encode_missing(self) -> CacheReport:
        """Encode every registered entry not cached yet, chunk by chunk. Bad images go to the report."""
        with self._lock:
            for chunk in self._chunks:
                todo = [e for e in chunk if _key(e) in self._missing]
                if todo:
                    self._encode_group(todo)
            return self.report

    def finish(self) -> CacheReport:
        """``encode_missing`` and mark the cache finished (its encoder may be released). The totals."""
        report = self.encode_missing()
        self.finished = True
        return report

    def exclusive(self) -> AbstractContextManager[Any]:
        """Hold this while using the encoder's model elsewhere (sampling with the VAE): no thread encodes."""
        return self._lock

    def npz_path(self, entry: Entry) -> Path:
        item = entry.item
        return item.path.with_name(f"{item.path.stem}_{item.width:04d}x{item.height:04d}_{self.spec.suffix}.npz")

    # -- lookup and encoding --------------------------------------------------------------------------
    def _lookup(self, entry: Entry) -> _Record | None:
        """The stored record, or None when it must be encoded; raises for an image that failed."""
        failed = self._failed.get(entry.item.path)
        if failed is not None:
            raise failed
        key = _key(entry)
        record = self._records.get(key)
        if record is None and key in self._done and not self._in_memory():
            record = self._read_disk(entry)
        return record

    def _view(self, entry: Entry, record: _Record, flipped: bool) -> CachedLatents:
        if not flipped:
            return CachedLatents(record.latents, record.original_size, record.crop_left_top)
        if record.flipped is None:
            raise LatentCacheError(f"{entry.item.path}: flip_aug needs flipped latents; build the cache with flip=True")
        left, top = record.crop_left_top
        mirrored_left = entry.choice.resized[0] - left - entry.choice.bucket[0]
        return CachedLatents(record.flipped, record.original_size, (mirrored_left, top))

    def _encode_for(self, entry: Entry) -> _Record:
        """Encode ``entry`` with the missing members of its chunk (the lock is held). Raises if its image failed."""
        key = _key(entry)
        chunk = self._chunk_of.get(key, [entry])
        fresh = self._encode_group([e for e in chunk if _key(e) in self._missing or _key(e) == key])
        if key not in fresh:
            raise self._failed[entry.item.path]
        return fresh[key]

    def _encode_group(self, group: list[Entry]) -> dict[Key, _Record]:
        """Load, encode and store one batch of one bucket; bad images are recorded, not raised."""
        started = time.perf_counter()
        try:
            return self._encode_and_store(group)
        finally:
            self._report.seconds += time.perf_counter() - started

    def _encode_and_store(self, group: list[Entry]) -> dict[Key, _Record]:
        prepared, ok = [], []
        for entry in group:
            try:
                prepared.append(prepare_image(entry.item.path, entry.choice))
                ok.append(entry)
            except BadImageError as error:
                self._failed[entry.item.path] = error
                self._missing.discard(_key(entry))
                self._report.failed.append(error)
        fresh: dict[Key, _Record] = {}
        if ok:
            pixels = to_tensor([p.pixels for p in prepared])
            latents = self._run_encoder(pixels, ok, flipped=False)
            mirrored = self._run_encoder(torch.flip(pixels, dims=[3]), ok, flipped=True) if self.spec.flip else None
            for i, (entry, image) in enumerate(zip(ok, prepared)):
                record = _Record(latents[i], mirrored[i] if mirrored else None, image.original_size, image.crop_left_top)
                if self.spec.to_disk:
                    self._write_disk(entry, record)
                self._store(entry, record)
                fresh[_key(entry)] = record
            self._report.encoded += len(ok)
        self._tell_progress()
        return fresh

    def _run_encoder(self, pixels: torch.Tensor, entries: list[Entry], flipped: bool) -> list[torch.Tensor]:
        generators = [self._generator(entry, flipped) for entry in entries]
        with torch.no_grad():
            latents = self.spec.encode(pixels, generators).detach().float().cpu()
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

    def _generator(self, entry: Entry, flipped: bool) -> torch.Generator:
        """A CPU generator of its own per image and flip: the same noise whatever the encoding order or device."""
        seed = entry_seed(self.spec.seed, entry.item.path, entry.choice.bucket, flipped)
        return torch.Generator(device="cpu").manual_seed(seed)

    def _store(self, entry: Entry, record: _Record) -> None:
        key = _key(entry)
        self._done.add(key)
        self._missing.discard(key)
        if self._in_memory():
            self._records[key] = record

    def _in_memory(self) -> bool:
        """Whether records stay in memory (else they are read from their file at every use)."""
        return self.spec.keep_in_memory or not self.spec.to_disk

    def _tell_progress(self) -> None:
        if self._progress is not None:
            done = self._report.encoded + len(self._report.failed)
            self._progress(done, max(done, self._to_encode))

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

    def _current(self, arrays: dict, suffix: str, stat: os.stat_result) -> bool:
        """Whether a disk entry was made from this image file and this encoder."""
        same_file = tuple(arrays[f"nekoya_source_{suffix}"].tolist()) == (stat.st_mtime_ns, stat.st_size)
        return same_file and str(arrays.get(f"nekoya_fingerprint_{suffix}", "")) == self._fingerprint()

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
        if not self.spec.trust_disk and not self._current(arrays, suffix, stat):
            return None
        latents = torch.from_numpy(arrays[f"latents_{suffix}"])
        if tuple(latents.shape[1:]) != (latent_h, latent_w):
            return None
        flipped = arrays.get(f"latents_flipped_{suffix}") if self.spec.flip else None
        left, top = (int(v) for v in arrays[f"crop_ltrb_{suffix}"][:2])
        original = tuple(int(v) for v in arrays[f"original_size_{suffix}"])
        return _Record(latents, torch.from_numpy(flipped) if flipped is not None else None, original, (left, top))


def _key(entry: Entry) -> Key:
    return entry.item.path, entry.choice.bucket


def _unique(entries: Sequence[Entry]) -> list[Entry]:
    seen: dict[Key, Entry] = {}
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
