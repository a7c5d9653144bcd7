"""The epoch iterator: bucketed batches of images (or cached latents) with captions and weights.

Order, as sd-scripts: every image appears ``repeats`` times in its bucket; each epoch
a ``random.Random(seed + epoch)`` shuffles the batch order, then each bucket's
contents. Unlike sd-scripts the shuffle starts from the same canonical order every
epoch, and per-sample randomness (flip, crop, colour, caption) comes from a
generator seeded by (seed, epoch, batch index): so an epoch is a pure function of
the seed, and a resumed run that skips the first N batches sees exactly what the
uninterrupted run saw.

With a latent source (``latents=``), a batch holds latents instead of pixels; the
source may encode an image's latents the first time a batch asks for them.

Epochs are 1-based, as sd-scripts (``caption_dropout_every_n_epochs`` depends on it).

With a dataset config file, each image trains with its subset's caption rules, flip, colour and crop
settings, and a batch holds images of one dataset and one bucket, as many as that dataset's batch size
(sd-scripts' DatasetGroup: each dataset makes its own batches; the epoch shuffles all of them together).
"""
from __future__ import annotations

import random
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from trainer.data.buckets import Size
from trainer.data.captions import CaptionConfig, process_caption
from trainer.data.images import BadImageError, mask_file, prepare_image, prepare_mask, to_tensor
from trainer.data.samples import Entry, count_batches, group_by_bucket
from trainer.problems import NekoyaError

PREFETCH_BATCHES_PER_WORKER = 2


class DatasetError(NekoyaError, ValueError):
    """The dataset cannot be built (no images, bad bucket settings...)."""


@dataclass(frozen=True)
class DatasetConfig:
    batch_size: int = 1
    seed: int = 0
    prior_loss_weight: float = 1.0
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    captions: CaptionConfig = CaptionConfig()
    skip_bad_images: bool = True  # False: a bad image stops the run
    workers: int = 0  # threads decoding upcoming batches; 0 decodes on the caller's thread
    masked_loss: bool = False  # batches carry each image's alpha mask (sd-scripts' masked_loss with alpha_mask)
    processes: int = 1  # a run of several processes: each step's batch is split between them ...
    rank: int = 0  # ... and this process trains its share

    @classmethod
    def from_settings(cls, settings: Any, *, skip_bad_images: bool = True) -> "DatasetConfig":
        """The settings' values. With a dataset config file each image's subset overrides the caption rules and
        augmentations, and ``captions`` is a subset's changing rules when any subset's captions change (so the
        run does not cache text-encoder outputs for captions that are rewritten)."""
        return cls(
            batch_size=max(1, int(settings.train_batch_size)),
            seed=int(settings.seed or 0),
            prior_loss_weight=float(settings.prior_loss_weight),
            flip_aug=bool(settings.flip_aug),
            color_aug=bool(settings.color_aug),
            random_crop=bool(settings.random_crop),
            captions=_caption_rules(settings),
            skip_bad_images=skip_bad_images,
            workers=max(0, int(settings.max_data_loader_n_workers or 0)),
            masked_loss=bool(getattr(settings, "masked_loss", False)),
            processes=max(1, int(getattr(settings, "num_processes", 1) or 1)),
        )


@dataclass
class Batch:
    epoch: int  # 1-based
    index: int  # 0-based batch index within the epoch
    bucket: Size  # (width, height) shared by every sample
    paths: list[Path]
    captions: list[str]
    is_reg: list[bool]
    loss_weights: torch.Tensor  # (B,) prior_loss_weight for reg samples, else 1
    flipped: list[bool]
    original_sizes_hw: list[tuple[int, int]]  # SDXL size conditioning, (height, width)
    crop_top_lefts: list[tuple[int, int]]  # (top, left)
    target_sizes_hw: list[tuple[int, int]]
    images: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]
    latents: torch.Tensor | None = None  # (B, C, H/8, W/8), unscaled VAE output
    bad_images: list[BadImageError] = field(default_factory=list)
    masks: torch.Tensor | None = None  # (B, H, W) loss masks in [0, 1] at the bucket's pixel size (masked_loss)
    # each sample's place in the step's whole batch (all processes), "seed/epoch/batch/position": its random
    # draws (augmentations, noise, timesteps) are seeded from it, so they do not depend on who trains it
    row_keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def size_conditioning(self) -> torch.Tensor:
        """(B, 6) long: original (h, w), crop (top, left), target (h, w), the SDXL ``add_time_ids`` order."""
        rows = [o + c + t for o, c, t in zip(self.original_sizes_hw, self.crop_top_lefts, self.target_sizes_hw)]
        return torch.tensor(rows, dtype=torch.long)


@dataclass(frozen=True)
class CachedLatents:
    latents: torch.Tensor  # (C, h, w)
    original_size: Size  # (width, height)
    crop_left_top: Size


class LatentSource(Protocol):
    """Latents per entry, e.g. ``trainer.data.latent_cache.LatentCache``."""

    def get(self, entry: Entry, flipped: bool) -> CachedLatents:
        """The entry's latents. May encode them on first use, and runs on the data workers' threads when
        ``workers`` > 0 (so it must be thread-safe). An image that cannot be loaded raises its
        ``BadImageError``: the batch reports it and skips it (or stops) like any bad image."""


BadImageCallback = Callable[[BadImageError], None]


class TrainingDataset:
    """Bucketed batches for one run. Build it from the plan's entries so the step counts agree."""

    def __init__(
        self,
        entries: Sequence[Entry],
        config: DatasetConfig,
        *,
        latents: LatentSource | None = None,
        on_bad_image: BadImageCallback | None = None,
    ) -> None:
        if not entries:
            raise DatasetError("no training images")
        self.entries = list(entries)
        self.config = config
        self.latents = latents
        self.on_bad_image = on_bad_image
        if any(entry.item.subset is not None for entry in self.entries):  # from a dataset config: by dataset
            self.buckets = _group_by_dataset_and_bucket(self.entries)
            self.batch_sizes = [self.entries[indices[0]].item.subset.batch_size for indices in self.buckets.values()]
        else:
            self.buckets = group_by_bucket(self.entries)
            self.batch_sizes = [config.batch_size] * len(self.buckets)
        self.batch_sizes = [size * max(1, config.processes) for size in self.batch_sizes]  # every process's share
        self.batches_per_epoch = sum(count_batches([len(indices)], size)
                                     for indices, size in zip(self.buckets.values(), self.batch_sizes))
        self.bad_paths: set[Path] = set()

    @classmethod
    def from_settings(cls, settings: Any, plan=None, **kwargs) -> "TrainingDataset":
        """Scan the folders (or reuse ``plan``, a StepPlan) and build the dataset for these settings."""
        from trainer.data.plan import plan_steps

        plan = plan if plan is not None else plan_steps(settings)
        if plan.errors:
            raise DatasetError("; ".join(plan.errors))
        return cls(plan.entries, DatasetConfig.from_settings(settings), **kwargs)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Entry indices of each batch of an epoch, in order. Depends only on (seed, epoch)."""
        rng = random.Random(self.config.seed + epoch)
        sizes = self.batch_sizes
        slots = [(b, k) for b, indices in enumerate(self.buckets.values()) for k in range(-(-len(indices) // sizes[b]))]
        rng.shuffle(slots)
        shuffled = [list(indices) for indices in self.buckets.values()]
        for indices in shuffled:
            rng.shuffle(indices)
        return [shuffled[b][k * sizes[b] : (k + 1) * sizes[b]] for b, k in slots]

    def iter_epoch(self, epoch: int, start_batch: int = 0, executor: Executor | None = None) -> Iterator[Batch]:
        """Batches of ``epoch`` from index ``start_batch`` on (resume).

        Bad images are reported through ``on_bad_image`` once, then skipped or raised.
        """
        plan = list(enumerate(self.epoch_batches(epoch)))[start_batch:]
        jobs = (lambda i=i, members=members: self._build_batch(epoch, i, members) for i, members in plan)
        own_executor = executor is None and self.config.workers > 0
        if own_executor:
            executor = ThreadPoolExecutor(self.config.workers, thread_name_prefix="nekoya-data")
        try:
            for batch in _prefetched(jobs, executor, self.config.workers * PREFETCH_BATCHES_PER_WORKER):
                for error in batch.bad_images:
                    self._report_bad(error)
                if len(batch):
                    yield batch
        finally:
            if own_executor:
                executor.shutdown(wait=True, cancel_futures=True)

    def row_key(self, epoch: int, batch_index: int, position: int) -> str:
        return f"{self.config.seed}/{epoch}/{batch_index}/{position}"

    def sample_rng(self, row_key: str) -> random.Random:
        # a string seed is hashed with SHA-512 by random.Random: stable across processes
        return random.Random(row_key)

    def rank_share(self, members: list[int]) -> list[tuple[int, int, float]]:
        """This process's part of a step's batch: (position in the batch, entry, loss scale) per sample.

        The batch is split as evenly as it goes; each share's loss is scaled so that the processes' averaged
        gradients equal one process training the whole batch. A process left without a sample (a bucket's
        last, small batch) trains the first one with scale 0, so every process takes part in the step.
        """
        processes, rank, count = max(1, self.config.processes), self.config.rank, len(members)
        if processes == 1:
            return [(i, m, 1.0) for i, m in enumerate(members)]
        start = rank * (count // processes) + min(rank, count % processes)
        size = count // processes + (1 if rank < count % processes else 0)
        if size == 0:
            return [(0, members[0], 0.0)]
        return [(start + i, members[start + i], size * processes / count) for i in range(size)]

    def _report_bad(self, error: BadImageError) -> None:
        first_time = error.path not in self.bad_paths
        self.bad_paths.add(error.path)
        if first_time and self.on_bad_image is not None:
            self.on_bad_image(error)
        if not self.config.skip_bad_images:
            raise error

    def _build_batch(self, epoch: int, index: int, members: list[int]) -> Batch:
        batch = Batch(epoch, index, self.entries[members[0]].choice.bucket, [], [], [], torch.empty(0), [], [], [], [])
        parts = _BatchParts()
        for position, member, scale in self.rank_share(members):
            self._add_sample(batch, parts, position, member, scale)
        if not batch.paths and self.config.processes > 1:
            # every process takes part in every step: when bad images emptied this share, the first good sample of
            # the whole batch stands in with weight 0 (no good sample anywhere: every process skips the batch)
            for position, member in enumerate(members):
                if self._add_sample(batch, parts, position, member, 0.0):
                    break
        batch.loss_weights = torch.tensor(parts.weights, dtype=torch.float32)
        if parts.pixels:
            batch.images = to_tensor([p.pixels for p in parts.pixels])
        if parts.latents:
            batch.latents = torch.stack([c.latents for c in parts.latents])
        if parts.masks:
            batch.masks = torch.from_numpy(np.stack(parts.masks))
        return batch

    def _add_sample(self, batch: Batch, parts: "_BatchParts", position: int, member: int, scale: float) -> bool:
        """Load one sample into the batch; False (its error noted in the batch) when its image is bad."""
        entry, row_key = self.entries[member], self.row_key(batch.epoch, batch.index, position)
        rng = self.sample_rng(row_key)
        rules = _SampleRules.of(entry, self.config)
        flipped = rules.flip_aug and rng.random() < 0.5
        try:
            sample = self._load_sample(entry, flipped, rng)
            original, crop_left_top = sample.original_size, sample.crop_left_top
            if self.config.masked_loss:  # recomputed from the file, so cached latents keep their masks
                parts.masks.append(prepare_mask(entry.item.path, entry.choice, flip=flipped,
                                                crop_left_top=crop_left_top, mask_path=_mask_path(entry)))
        except BadImageError as error:
            batch.bad_images.append(error)
            return False
        bucket = batch.bucket
        (parts.latents if isinstance(sample, CachedLatents) else parts.pixels).append(sample)
        batch.paths.append(entry.item.path)
        batch.captions.append(process_caption(entry.item.caption, rules.captions, batch.epoch, rng))
        batch.is_reg.append(entry.item.is_reg)
        parts.weights.append((self.config.prior_loss_weight if entry.item.is_reg else 1.0) * scale)
        batch.row_keys.append(row_key)
        batch.flipped.append(flipped)
        batch.original_sizes_hw.append((original[1], original[0]))
        batch.crop_top_lefts.append((crop_left_top[1], crop_left_top[0]))
        batch.target_sizes_hw.append((bucket[1], bucket[0]))
        return True

    def _load_sample(self, entry: Entry, flipped: bool, rng: random.Random):
        if entry.item.path in self.bad_paths:
            raise BadImageError(entry.item.path, "failed earlier in this run")
        if self.latents is not None:
            return self.latents.get(entry, flipped)
        rules = _SampleRules.of(entry, self.config)
        return prepare_image(
            entry.item.path,
            entry.choice,
            flip=flipped,
            crop_rng=rng if rules.random_crop else None,
            color_rng=rng if rules.color_aug else None,
        )


@dataclass
class _BatchParts:
    """A batch's samples while it is built."""

    pixels: list = field(default_factory=list)
    latents: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    masks: list = field(default_factory=list)


@dataclass(frozen=True)
class _SampleRules:
    """What one image trains with: its subset's rules (dataset config), else the run's."""

    captions: CaptionConfig
    flip_aug: bool
    color_aug: bool
    random_crop: bool

    @staticmethod
    def of(entry: Entry, config: DatasetConfig) -> "_SampleRules":
        subset = entry.item.subset
        source = subset if subset is not None else config
        return _SampleRules(source.captions, source.flip_aug, source.color_aug, source.random_crop)


def _mask_path(entry: Entry) -> Path | None:
    """The image's mask file when its subset has a mask folder (conditioning_data_dir), else None (its alpha)."""
    folder = getattr(entry.item.subset, "conditioning_data_dir", None)
    if folder is None:
        return None
    found = mask_file(entry.item.path, folder)
    if found is None:
        raise BadImageError(entry.item.path, f"no mask of the same name in conditioning_data_dir {folder}")
    return found


def _group_by_dataset_and_bucket(entries: Sequence[Entry]) -> dict[tuple[int, Size], list[int]]:
    """(dataset, bucket) -> entry indices, each listed ``repeats`` times, sorted: a batch never mixes datasets."""
    groups: dict[tuple[int, Size], list[int]] = {}
    for index, entry in enumerate(entries):
        groups.setdefault((entry.item.dataset, entry.choice.bucket), []).extend([index] * entry.repeats)
    return {key: groups[key] for key in sorted(groups)}


def _caption_rules(settings: Any) -> CaptionConfig:
    rules = CaptionConfig.from_settings(settings)
    from trainer.data.dataset_config import DatasetConfigError, dataset_config_path, load_dataset_config

    if not rules.is_static or not dataset_config_path(settings):
        return rules
    try:
        subsets = load_dataset_config(settings).subsets
    except DatasetConfigError:  # the check reports it; no run starts with it
        return rules
    return next((subset.captions for subset in subsets if not subset.captions.is_static), rules)


def _prefetched(jobs: Iterator[Callable[[], Batch]], executor: Executor | None, ahead: int) -> Iterator[Batch]:
    """Run jobs in order, keeping up to ``ahead`` of them in flight on the executor."""
    if executor is None:
        for job in jobs:
            yield job()
        return
    pending: deque = deque()
    for job in jobs:
        pending.append(executor.submit(job))
        if len(pending) > max(1, ahead):
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
