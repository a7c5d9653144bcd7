"""Which samples an epoch holds: repeats, regularisation balancing, buckets, batch counts.

Shared by the step plan (headers only) and the dataset (real iteration), so both
always agree on the number of batches in an epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from trainer.data.buckets import BucketChoice, Bucketer, Size
from trainer.data.folders import ImageItem, Skipped


@dataclass(frozen=True)
class Entry:
    """An image registered for training with its effective repeats and bucket."""

    item: ImageItem
    repeats: int  # train: the folder's repeats; reg: after balancing
    choice: BucketChoice


def balance_reg_repeats(train_samples: int, reg_items: Sequence[ImageItem]) -> list[tuple[ImageItem, int]]:
    """sd-scripts' DreamBooth balancing: reg samples per epoch reach the train samples.

    Reg images are taken in order, each with its folder's repeats, until their total
    reaches ``train_samples``; if all are taken and it is still short, each gets +1
    repeat in turn until it is reached. Reg images beyond that are not used.
    """
    registered: list[list] = []
    total = 0
    for item in reg_items:
        if total >= train_samples:
            break
        registered.append([item, item.repeats])
        total += item.repeats
    while registered and total < train_samples:
        for pair in registered:
            pair[1] += 1
            total += 1
            if total >= train_samples:
                break
    return [(item, repeats) for item, repeats in registered]


def build_entries(
    train_items: Sequence[ImageItem], reg_items: Sequence[ImageItem], bucketer: Bucketer
) -> tuple[list[Entry], list[Skipped]]:
    """Train entries, then balanced reg entries, each with its bucket. Images no bucket fits are skipped."""
    skipped: list[Skipped] = []
    entries: list[Entry] = []
    train_with_repeats = [(item, item.repeats) for item in train_items]
    candidates = train_with_repeats + balance_reg_repeats(sum(r for _, r in train_with_repeats), reg_items)
    for item, repeats in candidates:
        try:
            choice = bucketer.select(item.width, item.height)
        except ValueError as exc:
            skipped.append(Skipped(item.path, str(exc), getattr(exc, "fix", "")))
            continue
        entries.append(Entry(item, repeats, choice))
    return entries, skipped


def group_by_bucket(entries: Sequence[Entry]) -> dict[Size, list[int]]:
    """Bucket -> entry indices, each index listed ``repeats`` times; buckets in sorted order."""
    buckets: dict[Size, list[int]] = {}
    for index, entry in enumerate(entries):
        buckets.setdefault(entry.choice.bucket, []).extend([index] * entry.repeats)
    return {bucket: buckets[bucket] for bucket in sorted(buckets)}


def count_batches(bucket_sizes: Iterable[int], batch_size: int) -> int:
    """Batches per epoch: a batch never mixes buckets, so each bucket rounds up on its own."""
    return sum(math.ceil(size / batch_size) for size in bucket_sizes)
