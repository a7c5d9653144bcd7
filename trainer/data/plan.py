"""The step plan: how many steps a run takes and why, from image headers only.

Used by the GUI's live plan, by preflight and by the training loop, so all three
show the same numbers. The rules are sd-scripts' (``train_network.py``):

* batches per epoch = sum over buckets of ceil(samples in bucket / batch size),
  with repeats and balanced regularisation samples included;
* optimizer steps per epoch = ceil(batches per epoch / gradient accumulation);
* ``max_train_epochs`` > 0 fixes the epochs and overrides ``max_train_steps``;
* ``max_train_steps`` > 0 fixes the steps, epochs = ceil(steps / steps per epoch);
* ``max_train_steps`` = 0 (our default) means epochs x steps per epoch.

With a dataset config file (``dataset_config``, see ``trainer.data.dataset_config``) each dataset has its own
buckets, batch size and reg balancing, and the batches per epoch are the sum of every dataset's, as sd-scripts'
DatasetGroup concatenates its datasets; the plan lists each dataset and its subsets.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from trainer.data.buckets import BucketConfigError, Bucketer, BucketSettings, Size
from trainer.data.dataset_config import DatasetConfigError, DatasetToml, dataset_config_path, load_dataset_config
from trainer.data.folders import Concept, ScanResult, Skipped, scan_dataset_config, scan_dataset_dir
from trainer.data.samples import Entry, build_entries, count_batches, group_by_bucket

UPSCALE_WARNING_FACTOR = 1.5


@dataclass(frozen=True)
class PlanConfig:
    batch_size: int = 1
    grad_accum: int = 1
    epochs: int = 1
    max_train_epochs: int = 0
    max_train_steps: int = 0
    processes: int = 1  # batch_size is the whole step's: train_batch_size from each of them

    @classmethod
    def from_settings(cls, settings: Any) -> "PlanConfig":
        processes = max(1, int(getattr(settings, "num_processes", 1) or 1))
        return cls(
            batch_size=max(1, int(settings.train_batch_size)) * processes,
            processes=processes,
            grad_accum=max(1, int(settings.gradient_accumulation_steps)),
            epochs=max(1, int(settings.epoch)),
            max_train_epochs=max(0, int(settings.max_train_epochs or 0)),
            max_train_steps=max(0, int(settings.max_train_steps or 0)),
        )


@dataclass(frozen=True)
class FolderLine:
    folder: str
    images: int  # found in the folder
    repeats: int  # the folder's own
    samples: int  # per epoch; for reg folders after balancing
    is_reg: bool
    captions_found: int
    images_used: int  # left out: no bucket fits them, or reg images that balancing does not need
    repeat_groups: tuple[tuple[int, int], ...] = ()  # (images, repeats) as used; balancing varies reg repeats
    subset: str = ""  # from a dataset config: the subset's table, e.g. "datasets[0].subsets[1]"
    path: str = ""  # from a dataset config: the subset's image_dir
    dataset: int = 0

    def describe(self) -> str:
        """``10_sks dog: 4 of 12 images × 10 repeats = 40 samples (8 left out), 12 caption files``: it multiplies out."""
        kind = "reg " if self.is_reg else ""
        groups = self.repeat_groups or ((self.images_used, self.repeats),)
        head = f"{kind}{self.folder}" if not self.subset else f"{kind}subset [{self.subset}] {self.path}"
        text = f"{head}: {_images_times_repeats(groups, self.images)} = {self.samples} samples"
        notes = []
        if self.is_reg and any(repeats != self.repeats for _, repeats in groups):
            source = "num_repeats is" if self.subset else "the folder says"
            notes.append(f"repeats balanced to the train samples; {source} {self.repeats}")
        left_out = self.images - self.images_used
        if left_out:
            notes.append(f"{left_out} unused: balancing needs no more" if self.is_reg else f"{left_out} left out: see the warnings")
        return text + "".join(f" ({note})" for note in notes) + f", {self.captions_found} caption files"


def _images_times_repeats(groups: Sequence[tuple[int, int]], found: int | None = None) -> str:
    """``4 of 12 images × 10 repeats``, or ``(1 image × 4 repeats + 2 images × 3 repeats)`` when repeats differ."""
    if len(groups) == 1:
        used, repeats = groups[0]
        images = f"{used} of {found} images" if found is not None and found != used else _count(used, "image")
        return f"{images} × {_count(repeats, 'repeat')}"
    return "(" + " + ".join(f"{_count(n, 'image')} × {_count(r, 'repeat')}" for n, r in groups) + ")"


@dataclass(frozen=True)
class DatasetLine:
    """One dataset of a dataset config: its resolution, batch size and buckets, and what it adds to an epoch."""

    index: int  # 0-based, as the file's [[datasets]]
    resolution: Size
    batch_size: int
    enable_bucket: bool
    bucket_text: str  # "buckets 256-1024, step 64" or "no buckets"
    samples: int  # per epoch, train + reg
    batches: int
    buckets: tuple[tuple[Size, int], ...]
    subsets: tuple[FolderLine, ...]

    def describe(self) -> str:
        (w, h), reg = self.resolution, sum(line.samples for line in self.subsets if line.is_reg)
        samples = f"{self.samples} samples" + (f" ({reg} reg)" if reg else "")
        return (f"dataset {self.index + 1} [datasets[{self.index}]]: resolution {w}x{h}, batch {self.batch_size}, "
                f"{self.bucket_text}: {samples} = {_batches(self.batches)}")


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    epochs: int
    batches_per_epoch: int
    batch_size: int
    grad_accum: int
    train_images: int  # used: a bucket fits them
    train_samples: int  # per epoch, with repeats
    reg_images: int  # used after balancing
    reg_samples: int  # per epoch, after balancing
    per_folder: tuple[FolderLine, ...]
    buckets: tuple[tuple[Size, int], ...]  # (width, height), samples per epoch
    formula: str
    warnings: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()  # the run cannot start
    skipped: tuple[Skipped, ...] = ()
    entries: tuple[Entry, ...] = field(default=(), repr=False, compare=False)
    train_images_found: int = 0  # in the folders, readable or not
    datasets: tuple[DatasetLine, ...] = ()  # from a dataset config file; empty for folder-based runs
    dataset_config: str = ""  # its path

    @property
    def train_images_left_out(self) -> int:
        return max(0, self.train_images_found - self.train_images)

    @property
    def ok(self) -> bool:
        return not self.errors and self.total_steps > 0

    def resume_position(self, steps_done: int) -> tuple[int, int]:
        """(1-based epoch, batch index to start from) after ``steps_done`` optimizer steps."""
        if self.steps_per_epoch <= 0:
            return 1, 0
        epoch_index, step_in_epoch = divmod(steps_done, self.steps_per_epoch)
        return epoch_index + 1, step_in_epoch * self.grad_accum

    def summary(self) -> str:
        """The formula, the folders and the buckets (the warnings are the preflight report's to show)."""
        if self.datasets:
            lines = [self.formula, f"datasets from {self.dataset_config}:"]
            for dataset in self.datasets:
                lines += [dataset.describe(), *(f"  {line.describe()}" for line in dataset.subsets)]
                if dataset.buckets:
                    lines.append("  buckets: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in dataset.buckets))
            return "\n".join(lines)
        lines = [self.formula, *(line.describe() for line in self.per_folder)]
        if self.buckets:
            lines.append("buckets: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.buckets))
        return "\n".join(lines)

    def readiness(self) -> str:
        """``Ready to train.``, or with how many images when some are left out."""
        left_out = self.train_images_left_out
        if not left_out:
            return "Ready to train."
        return (f"Ready to train with {self.train_images} of {_count(self.train_images_found, 'image')} "
                f"({left_out} left out: see the warnings).")


def plan_steps(settings: Any) -> StepPlan:
    """Scan ``train_data_dir`` / ``reg_data_dir`` (or the subsets of ``dataset_config``) and compute the plan."""
    if dataset_config_path(settings):
        return plan_dataset_config(settings)
    caption_extension = settings.caption_extension
    train = scan_dataset_dir(settings.train_data_dir, is_reg=False, caption_extension=caption_extension)
    reg = None
    if settings.reg_data_dir:
        reg = scan_dataset_dir(settings.reg_data_dir, is_reg=True, caption_extension=caption_extension)
    try:
        bucket_settings = BucketSettings.from_settings(settings)
        config_error = None
    except BucketConfigError as exc:
        bucket_settings, config_error = None, str(exc)
    return plan_from_scans(train, reg, bucket_settings, PlanConfig.from_settings(settings), config_error)


def plan_from_scans(
    train: ScanResult,
    reg: ScanResult | None,
    bucket_settings: BucketSettings | None,
    config: PlanConfig,
    config_error: str | None = None,
) -> StepPlan:
    errors = list(train.problems)
    warnings = list(train.warnings)
    skipped = list(train.skipped)
    if reg is not None:
        (errors if not reg.root.is_dir() else warnings).extend(reg.problems)
        warnings.extend(reg.warnings)
        skipped.extend(reg.skipped)
    entries: list[Entry] = []
    try:
        if config_error:
            errors.append(config_error)
        else:
            entries, unbucketable = build_entries(train.images, reg.images if reg else [], Bucketer(bucket_settings))
            skipped.extend(unbucketable)
    except BucketConfigError as exc:
        errors.append(str(exc))

    buckets = group_by_bucket(entries)
    batches = count_batches((len(v) for v in buckets.values()), config.batch_size)
    steps_per_epoch, epochs, total = schedule(batches, config)
    scan_skipped = train.skipped + (reg.skipped if reg else ())
    folders = _folder_lines(train.concepts + (reg.concepts if reg else ()), entries, scan_skipped)
    train_samples = sum(e.repeats for e in entries if not e.item.is_reg)
    reg_samples = sum(e.repeats for e in entries if e.item.is_reg)
    warnings += _warnings(config, buckets, entries, reg, reg_samples, skipped)
    if not errors and total == 0:
        errors.append("the plan has 0 steps: no usable training images")
    plan = StepPlan(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=epochs,
        batches_per_epoch=batches,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        train_images=sum(1 for e in entries if not e.item.is_reg),
        train_samples=train_samples,
        reg_images=sum(1 for e in entries if e.item.is_reg),
        reg_samples=reg_samples,
        per_folder=tuple(folders),
        buckets=tuple((bucket, len(indices)) for bucket, indices in buckets.items()),
        formula="",
        warnings=tuple(warnings),
        errors=tuple(errors),
        skipped=tuple(skipped),
        entries=tuple(entries),
        train_images_found=len(train.images) + sum(1 for skip in train.skipped if skip.path.is_file()),
    )
    return replace(plan, formula=_formula(plan, config))


def schedule(batches_per_epoch: int, config: PlanConfig) -> tuple[int, int, int]:
    """(optimizer steps per epoch, epochs, total steps) by sd-scripts' rules."""
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    if steps_per_epoch == 0:
        return 0, 0, 0
    if config.max_train_epochs > 0:
        return steps_per_epoch, config.max_train_epochs, config.max_train_epochs * steps_per_epoch
    if config.max_train_steps > 0:
        return steps_per_epoch, math.ceil(config.max_train_steps / steps_per_epoch), config.max_train_steps
    return steps_per_epoch, config.epochs, config.epochs * steps_per_epoch


def _folder_lines(concepts: Sequence[Concept], entries: Sequence[Entry], skipped: Sequence[Skipped]) -> list[FolderLine]:
    used: dict[tuple[str, bool], list[Entry]] = {}
    for entry in entries:
        used.setdefault((str(entry.item.path.parent), entry.item.is_reg), []).append(entry)
    # files the scan could not use (unreadable image header, caption not UTF-8): one image each
    unreadable = Counter(str(skip.path.parent) for skip in skipped if skip.path.is_file())
    lines = []
    for concept in concepts:
        concept_entries = used.get((str(concept.folder), concept.is_reg), [])
        lines.append(
            FolderLine(
                folder=concept.folder.name,
                images=len(concept.images) + unreadable[str(concept.folder)],
                repeats=concept.repeats,
                samples=sum(e.repeats for e in concept_entries),
                is_reg=concept.is_reg,
                captions_found=concept.captions_found,
                images_used=len(concept_entries),
                repeat_groups=_repeat_groups(concept_entries),
            )
        )
    return lines


def _repeat_groups(entries: Sequence[Entry]) -> tuple[tuple[int, int], ...]:
    """(images, repeats) pairs, most repeats first: one pair unless balancing gave some reg images one more."""
    counts = Counter(entry.repeats for entry in entries)
    return tuple((counts[repeats], repeats) for repeats in sorted(counts, reverse=True))


def _warnings(
    config: PlanConfig,
    buckets: dict[Size, list[int]],
    entries: Sequence[Entry],
    reg: ScanResult | None,
    reg_samples: int,
    skipped: Sequence[Skipped],
) -> list[str]:
    warnings = []
    if config.max_train_epochs > 0 and config.max_train_steps > 0:
        warnings.append(
            f"max_train_epochs ({config.max_train_epochs}) overrides "
            f"max_train_steps ({config.max_train_steps}), as in sd-scripts"
        )
    if reg is not None and reg.samples > reg_samples:
        unused = len(reg.images) - sum(1 for e in entries if e.item.is_reg)
        warnings.append(
            f"regularisation: {reg_samples} of {reg.samples} reg samples are used per epoch (balanced to the "
            f"train samples); {unused} reg image(s) are never used"
        )
    if config.batch_size > 1:
        small = sum(1 for indices in buckets.values() if len(indices) % config.batch_size)
        if small:
            warnings.append(
                f"{small} of {len(buckets)} buckets end with a partial batch (fewer than {config.batch_size} samples)"
            )
    upscaled = [e for e in entries if e.choice.resized[0] >= UPSCALE_WARNING_FACTOR * e.item.width]
    if upscaled:
        worst = min(upscaled, key=lambda e: e.item.width * e.item.height).item
        warnings.append(
            f"{len(upscaled)} image(s) are enlarged {UPSCALE_WARNING_FACTOR}× or more to fit their bucket "
            f"(smallest: {worst.path.name}, {worst.width}x{worst.height})"
        )
    if skipped:
        listed = "; ".join(f"{s.path.name}: {s.reason}" for s in skipped[:5])
        warnings.append(f"{len(skipped)} folder(s)/file(s) skipped: {listed}" + (" ..." if len(skipped) > 5 else ""))
    return warnings


def _formula(plan: StepPlan, config: PlanConfig) -> str:
    """``4 images × 10 repeats × 3 epochs ÷ batch 2 = 60 steps``, from the images actually used.

    When a bucket's last batch is partial the division is not exact; the line then says so and how the
    batches add up.
    """
    if not plan.train_samples:
        return "no training images: 0 steps"
    train = [line for line in plan.per_folder if not line.is_reg and line.images_used]
    parts = [_images_times_repeats(line.repeat_groups) for line in train]
    samples = parts[0] if len(parts) == 1 else "(" + " + ".join(parts) + ")"
    if plan.reg_samples == plan.train_samples:
        samples += " × 2 (reg)"
    elif plan.reg_samples:
        samples = f"({samples} + {plan.reg_samples} reg samples)"
    divisors = f" ÷ batch {config.batch_size}{_per_process(config.batch_size, config.processes)}" + (f" ÷ grad accum {config.grad_accum}" if config.grad_accum > 1 else "")
    per_epoch = (plan.train_samples + plan.reg_samples) / config.batch_size / config.grad_accum
    steps_set = config.max_train_epochs <= 0 and config.max_train_steps > 0
    rounding = "" if per_epoch == plan.steps_per_epoch else _rounding_note(plan, config, per_epoch, not steps_set)
    if steps_set:
        return (
            f"max_train_steps = {plan.total_steps} steps (set directly); one epoch = {samples}{divisors} "
            f"= {plan.steps_per_epoch} steps{rounding}, so {_count(plan.epochs, 'epoch')}"
        )
    epoch_note = " (max_train_epochs)" if config.max_train_epochs > 0 else ""
    return f"{samples} × {_count(plan.epochs, 'epoch')}{epoch_note}{divisors} = {plan.total_steps} steps{rounding}"


def _rounding_note(plan: StepPlan, config: PlanConfig, per_epoch: float, with_epochs: bool) -> str:
    """Why the steps are more than the plain division: each bucket rounds its last, partial batch up."""
    sizes = [count for _, count in plan.buckets]
    batches = [math.ceil(size / config.batch_size) for size in sizes]
    if len(sizes) == 1:
        detail = f"1 bucket of {sizes[0]} samples = {batches[0]} batches"
    elif len(sizes) <= 4:
        detail = (f"{len(sizes)} buckets of {' + '.join(map(str, sizes))} samples = "
                  f"{' + '.join(map(str, batches))} = {plan.batches_per_epoch} batches")
    else:
        detail = f"{len(sizes)} buckets of {sum(sizes)} samples in all = {plan.batches_per_epoch} batches"
    if config.grad_accum > 1:
        detail += f" ÷ grad accum {config.grad_accum} = {plan.steps_per_epoch} steps (rounded up)"
    if with_epochs:
        detail += f", × {_count(plan.epochs, 'epoch')} = {plan.total_steps}"
    return (f" (not exact: {_decimal(per_epoch)} steps per epoch, but a batch never mixes buckets, so each bucket's "
            f"last batch is rounded up: {detail})")


def _per_process(batch_size: int, processes: int) -> str:
    return f" ({batch_size // processes} per process × {processes} processes)" if processes > 1 else ""


def _decimal(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# ---- a dataset config file: several datasets, each with its subsets ------------------------------------------

def plan_dataset_config(settings: Any) -> StepPlan:
    """The plan of the datasets and subsets of the settings' ``dataset_config`` file."""
    config = PlanConfig.from_settings(settings)
    try:
        toml = load_dataset_config(settings)
    except DatasetConfigError as exc:
        return _empty_plan(config, str(exc), dataset_config_path(settings))
    train, reg = scan_dataset_config(toml)
    return plan_from_dataset_config(toml, train, reg, config)


def _empty_plan(config: PlanConfig, error: str, path: str) -> StepPlan:
    return StepPlan(0, 0, 0, 0, config.batch_size, config.grad_accum, 0, 0, 0, 0, (), (),
                    "no training images: 0 steps", errors=(error,), dataset_config=path)


def not_applied_warning(toml: DatasetToml) -> str:
    return (f"dataset_config {toml.path}: {'; '.join(toml.not_applied)}: "
            f"{'is' if len(toml.not_applied) == 1 else 'are'} not applied by Nekoya (sd-scripts would apply them)")


def dataset_bucket_error(toml: DatasetToml, dataset) -> str:
    """A dataset's bucket settings that cannot work together, named by file, table and key ("" when they can)."""
    try:
        Bucketer(dataset.buckets)
    except BucketConfigError as exc:
        return f"dataset_config {toml.path}: [{dataset.table}] {exc.field}: {exc.message}"
    return ""


def plan_from_dataset_config(toml: DatasetToml, train: ScanResult, reg: ScanResult | None,
                             config: PlanConfig) -> StepPlan:
    scans = [train] + ([reg] if reg is not None else [])
    errors = [problem for scan in scans for problem in scan.problems]
    warnings = [warning for scan in scans for warning in scan.warnings]
    skipped = [skip for scan in scans for skip in scan.skipped]
    warnings.extend(toml.ignored)
    if toml.not_applied:
        warnings.append(not_applied_warning(toml))
    concepts = train.concepts + (reg.concepts if reg is not None else ())
    entries: list[Entry] = []
    lines: list[DatasetLine] = []
    all_buckets: Counter = Counter()
    for dataset in toml.datasets:
        bucket_error = dataset_bucket_error(toml, dataset)
        if bucket_error:
            errors.append(bucket_error)
            continue
        train_items = [item for item in train.images if item.dataset == dataset.index]
        reg_items = [item for item in (reg.images if reg is not None else []) if item.dataset == dataset.index]
        own, unbucketable = build_entries(train_items, reg_items, Bucketer(dataset.buckets))
        batch_size = dataset.batch_size * config.processes  # the step's whole batch
        skipped.extend(unbucketable)
        entries.extend(own)
        buckets = group_by_bucket(own)
        for bucket, indices in buckets.items():
            all_buckets[bucket] += len(indices)
        own_concepts = [c for c in concepts if c.subset is not None and c.subset.dataset_index == dataset.index]
        subset_lines = _subset_lines(own_concepts, own, [skip for scan in scans for skip in scan.skipped])
        lines.append(DatasetLine(
            index=dataset.index, resolution=dataset.resolution, batch_size=batch_size,
            enable_bucket=dataset.buckets.enable_bucket, bucket_text=_bucket_text(dataset.buckets),
            samples=sum(e.repeats for e in own), batches=count_batches((len(v) for v in buckets.values()), batch_size),
            buckets=tuple((bucket, len(indices)) for bucket, indices in buckets.items()), subsets=tuple(subset_lines)))
        if batch_size > 1:
            partial = sum(1 for indices in buckets.values() if len(indices) % batch_size)
            if partial:
                warnings.append(f"dataset {dataset.index + 1}: {partial} of {len(buckets)} buckets end with a partial "
                                f"batch (fewer than {batch_size} samples)")
    batches = sum(line.batches for line in lines)
    steps_per_epoch, epochs, total = schedule(batches, config)
    train_samples = sum(e.repeats for e in entries if not e.item.is_reg)
    reg_samples = sum(e.repeats for e in entries if e.item.is_reg)
    no_batch_warnings = replace(config, batch_size=1)  # partial batches are counted per dataset above
    warnings += _warnings(no_batch_warnings, {}, entries, None, reg_samples, skipped)
    if reg is not None and reg.samples > reg_samples and train_samples:
        warnings.append(f"regularisation: {reg_samples} of {reg.samples} reg samples are used per epoch (each "
                        "dataset balances its reg subsets to its own train samples)")
    if not errors and total == 0:
        errors.append("the plan has 0 steps: no usable training images")
    plan = StepPlan(
        steps_per_epoch=steps_per_epoch, total_steps=total, epochs=epochs, batches_per_epoch=batches,
        batch_size=lines[0].batch_size if lines else config.batch_size, grad_accum=config.grad_accum,
        train_images=sum(1 for e in entries if not e.item.is_reg), train_samples=train_samples,
        reg_images=sum(1 for e in entries if e.item.is_reg), reg_samples=reg_samples,
        per_folder=tuple(line for dataset in lines for line in dataset.subsets),
        buckets=tuple(sorted(all_buckets.items())), formula="", warnings=tuple(warnings), errors=tuple(errors),
        skipped=tuple(skipped), entries=tuple(entries),
        train_images_found=len(train.images) + sum(1 for skip in train.skipped if skip.path.is_file()),
        datasets=tuple(lines), dataset_config=str(toml.path),
    )
    return replace(plan, formula=_datasets_formula(plan, config))


def _bucket_text(buckets: BucketSettings) -> str:
    if not buckets.enable_bucket:
        return "no buckets"
    if buckets.no_upscale:
        return f"buckets from the images (no upscale), step {buckets.reso_steps}"
    return f"buckets {buckets.min_reso}-{buckets.max_reso}, step {buckets.reso_steps}"


def _subset_lines(concepts: Sequence[Concept], entries: Sequence[Entry], skipped: Sequence[Skipped]) -> list[FolderLine]:
    used: dict[Any, list[Entry]] = {}
    for entry in entries:
        used.setdefault(entry.item.subset, []).append(entry)
    unreadable = Counter(str(skip.path.parent) for skip in skipped if skip.path.is_file())
    lines = []
    for concept in sorted(concepts, key=lambda c: c.subset.index):
        own = used.get(concept.subset, [])
        lines.append(FolderLine(
            folder=concept.folder.name, images=len(concept.images) + unreadable[str(concept.folder)],
            repeats=concept.repeats, samples=sum(e.repeats for e in own), is_reg=concept.is_reg,
            captions_found=concept.captions_found, images_used=len(own), repeat_groups=_repeat_groups(own),
            subset=concept.subset.table, path=str(concept.folder), dataset=concept.subset.dataset_index))
    return lines


def _dataset_samples(dataset: DatasetLine) -> str:
    """``(4 images × 10 repeats + 40 reg samples)`` for one dataset."""
    train = [line for line in dataset.subsets if not line.is_reg and line.images_used]
    parts = [_images_times_repeats(line.repeat_groups) for line in train] or ["0 images"]
    samples = parts[0] if len(parts) == 1 else "(" + " + ".join(parts) + ")"
    train_samples = sum(line.samples for line in train)
    reg = sum(line.samples for line in dataset.subsets if line.is_reg)
    if reg and reg == train_samples:
        return samples + " × 2 (reg)"
    return f"({samples} + {reg} reg samples)" if reg else samples


def _datasets_formula(plan: StepPlan, config: PlanConfig) -> str:
    """``dataset 1: 4 images × 10 repeats ÷ batch 2 = 20 batches + dataset 2: ... = 5 batches; 25 batches ×
    3 epochs = 75 steps``: each dataset divides by its own batch size and rounds each bucket up."""
    if not plan.train_samples:
        return "no training images: 0 steps"
    parts = []
    for dataset in plan.datasets:
        exact = dataset.samples / dataset.batch_size
        note = "" if exact == dataset.batches else f" (each bucket's last batch rounded up from {_decimal(exact)})"
        parts.append(f"dataset {dataset.index + 1}: {_dataset_samples(dataset)} ÷ batch {dataset.batch_size}"
                     f"{_per_process(dataset.batch_size, config.processes)} = {_batches(dataset.batches)}{note}")
    epoch = " + ".join(parts)
    batches = _batches(plan.batches_per_epoch) + (" per epoch" if len(parts) > 1 else "")
    accum = f" ÷ grad accum {config.grad_accum} = {_count(plan.steps_per_epoch, 'step')} (rounded up)" \
        if config.grad_accum > 1 else ""
    if config.max_train_epochs <= 0 and config.max_train_steps > 0:
        per_epoch = f"{plan.steps_per_epoch} steps" if not accum else f"{plan.batches_per_epoch} batches{accum}"
        return (f"max_train_steps = {plan.total_steps} steps (set directly); one epoch = {epoch}"
                + (f"; {batches}" if len(parts) > 1 else "") + f" = {per_epoch}, so {_count(plan.epochs, 'epoch')}")
    epoch_note = " (max_train_epochs)" if config.max_train_epochs > 0 else ""
    return f"{epoch}; {batches}{accum} × {_count(plan.epochs, 'epoch')}{epoch_note} = {plan.total_steps} steps"


def _batches(n: int) -> str:
    return f"{n} batch" if n == 1 else f"{n} batches"
