"""kohya's "Dreambooth/LoRA Folder preparation": build ``<dest>/img``, ``reg``, ``log``, ``model``.

``prepare_training_folders`` copies a flat folder of training images (with their
caption files) to ``<dest>/img/<repeats>_<instance> <class>`` and, optionally,
regularisation images to ``<dest>/reg/<repeats>_<class>``. Everything is checked
and planned before the first byte is copied; copies are staged; a re-run with the
same sources changes nothing; an existing concept folder with other content is
refused unless ``merge`` (which only adds files, never replaces one).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.folders import normalise_caption_extension, parse_concept_folder_name
from trainer.safety import GIB, free_bytes
from trainer.settings.field import request_infos

from .dest_lock import destination_lock
from .layout import (IMG, LOG, MODEL, REG, DatasetPrepError, check_distinct_sources, check_no_overlap, check_prompt,
                     check_repeats, check_source_dir, concept_folder_name, folder_settings, instance_includes_class,
                     reg_folder_name)
from .requests import PrepareRequest
from .staging import (FolderDiff, SourceImages, StagedCopy, collect_source, compare_with_destination,
                      remove_stale_staging)

FORM = PrepareRequest()  # the defaults of the folder preparation form
OPTIONS = request_infos(PrepareRequest)

TRAIN_LABEL, REG_LABEL = "training images", "regularisation images"


@dataclass(frozen=True)
class ConceptResult:
    """What happened (or, in a dry run, would happen) to one concept folder."""

    kind: str  # TRAIN_LABEL or REG_LABEL
    source: Path
    folder: Path
    status: str  # "created", "unchanged", "merged"; with "would be " in front in a dry run
    images: int  # images in the source
    images_copied: int
    captions_copied: int
    uncaptioned: int
    fallback_caption: str
    caption_extension: str
    other_captions: int
    kept_different: tuple[str, ...] = ()
    only_in_destination: tuple[str, ...] = ()
    dry_run: bool = False

    def describe(self) -> str:
        where = f"{self.folder.parent.name}/{self.folder.name}"
        copied = "to copy" if self.dry_run else "copied"
        text = (f"{self.kind}: {where}: {self.status}; {self.images} image(s) in the source, "
                f"{self.images_copied} image(s) and {self.captions_copied} caption file(s) {copied}")
        if self.uncaptioned:
            text += (f"; {self.uncaptioned} image(s) have no {self.caption_extension or 'caption'} file "
                     f"and train with the caption '{self.fallback_caption}'")
        if self.other_captions:
            text += (f"; {self.other_captions} of these have a caption file with another extension "
                     f"(not copied: set the caption extension to match)")
        if self.kept_different:
            text += (f"; kept the destination's version of {len(self.kept_different)} file(s) "
                     "that differ from the source")
        if self.only_in_destination:
            text += f"; {len(self.only_in_destination)} file(s) only in the destination were left as they are"
        return text


@dataclass(frozen=True)
class PrepareResult:
    destination: Path
    train: ConceptResult
    reg: ConceptResult | None
    settings: dict[str, str]  # Folders tab values keyed by kohya keys (train_data_dir, reg_data_dir, ...)
    notes: tuple[str, ...] = ()
    dry_run: bool = False

    @property
    def images_copied(self) -> int:
        return self.train.images_copied + (self.reg.images_copied if self.reg else 0)

    @property
    def summary(self) -> str:
        head = f"Dry run, nothing written: {self.destination}" if self.dry_run else f"Prepared {self.destination}"
        lines = [head, "  " + self.train.describe()]
        if self.reg:
            lines.append("  " + self.reg.describe())
        lines.append(f"  {LOG}/ and {MODEL}/ " + ("would be created where missing" if self.dry_run else "are ready"))
        lines += [f"  note: {note}" for note in self.notes]
        lines.append("Folders: " + ", ".join(f"{key} = {value or '(none)'}" for key, value in self.settings.items()))
        return "\n".join(lines)


@dataclass
class _Plan:
    kind: str
    source: SourceImages
    target: Path
    diff: FolderDiff
    fallback_caption: str
    caption_extension: str
    existed: bool  # the concept folder was there before this run
    notes: list[str] = field(default_factory=list)


def prepare_training_folders(
    images_dir: str | os.PathLike,
    destination: str | os.PathLike,
    instance_prompt: str,
    class_prompt: str,
    repeats: int = FORM.repeats,
    reg_images_dir: str | os.PathLike | None = None,
    reg_repeats: int = FORM.reg_repeats,
    caption_extension: str = ".txt",
    *,
    merge: bool = FORM.merge,
    dry_run: bool = False,
) -> PrepareResult:
    """Copy the images into kohya's layout under ``destination``.

    Raises DatasetPrepError, having copied nothing, when the request is refused.
    """
    instance = check_prompt("Instance prompt", instance_prompt)
    klass = check_prompt("Class prompt", class_prompt)
    repeats = check_repeats("Repeats", repeats, OPTIONS["repeats"].ge)
    reg_repeats = check_repeats("Regularisation repeats", reg_repeats, OPTIONS["reg_repeats"].ge)
    extension = normalise_caption_extension(caption_extension)
    if not destination or not str(destination).strip():
        raise DatasetPrepError("Destination training directory is not set")
    dest = Path(destination).expanduser()
    if dest.exists() and not dest.is_dir():
        raise DatasetPrepError(f"the destination {dest} is a file, not a folder")

    train_dir = check_source_dir("Training images", images_dir)
    check_no_overlap(TRAIN_LABEL, train_dir, dest)
    with nullcontext() if dry_run else destination_lock(dest):
        return _prepare(train_dir, dest, instance, klass, repeats, reg_images_dir, reg_repeats, extension,
                        merge=merge, dry_run=dry_run)


def _prepare(train_dir: Path, dest: Path, instance: str, klass: str, repeats: int, reg_images_dir, reg_repeats: int,
             extension: str, *, merge: bool, dry_run: bool) -> PrepareResult:
    train_folder = concept_folder_name(repeats, instance, klass)
    plans = [_plan(TRAIN_LABEL, train_dir, dest / IMG / train_folder, extension, train_folder.partition("_")[2])]
    notes: list[str] = []
    if instance_includes_class(instance, klass):
        notes.append(f"the instance prompt '{instance}' already ends with the class '{klass}', "
                     f"so the folder is '{train_folder}' (not '{instance} {klass}')")
    if reg_images_dir and str(reg_images_dir).strip():
        reg_dir = check_source_dir("Regularisation images", reg_images_dir)
        check_no_overlap(REG_LABEL, reg_dir, dest)
        check_distinct_sources(train_dir, reg_dir)
        if reg_repeats > 0:
            plans.append(_plan(REG_LABEL, reg_dir, dest / REG / reg_folder_name(reg_repeats, klass), extension, klass))
        else:
            notes.append("regularisation repeats is 0, so the regularisation images were not copied")

    _refuse_conflicts(plans, merge)
    _check_space(plans, dest)
    if not dry_run:
        _execute(plans, dest)
    results = [_result(plan, merge, dry_run) for plan in plans]
    notes += [note for plan in plans for note in plan.notes]
    settings = folder_settings(dest)
    if dry_run and len(plans) > 1:
        settings["reg_data_dir"] = str(dest.absolute() / REG)
    reg_result = results[1] if len(results) > 1 else None
    return PrepareResult(dest.absolute(), results[0], reg_result, settings, tuple(notes), dry_run)


def _plan(kind: str, source_dir: Path, target: Path, extension: str, fallback: str) -> _Plan:
    source = collect_source(kind, source_dir, extension)
    if target.exists() and not target.is_dir():
        raise DatasetPrepError(f"{target} is a file; remove it or choose another destination")
    diff = compare_with_destination(source, target, extension)
    plan = _Plan(kind, source, target, diff, fallback, extension, existed=target.is_dir())
    others = _other_concept_folders(target)
    if others:
        plan.notes.append(f"{target.parent} also holds {', '.join(others)}; every <repeats>_<name> folder there "
                          "is trained, so remove the ones you no longer want")
    return plan


def _other_concept_folders(target: Path) -> list[str]:
    if not target.parent.is_dir():
        return []
    return sorted(p.name for p in target.parent.iterdir()
                  if p.is_dir() and p.name != target.name and parse_concept_folder_name(p.name))


def _refuse_conflicts(plans: list[_Plan], merge: bool) -> None:
    if merge:
        return
    problems = []
    for plan in plans:
        diff = plan.diff
        if plan.existed and not diff.identical:
            parts = [f"{len(diff.to_copy)} new file(s) in the source" if diff.to_copy else "",
                     f"{len(diff.different)} file(s) that differ (e.g. {diff.different[0]})" if diff.different else "",
                     f"{len(diff.only_in_destination)} file(s) only in the destination "
                     f"(e.g. {diff.only_in_destination[0]})" if diff.only_in_destination else ""]
            problems.append(f"{plan.target} already exists with other content: " + ", ".join(p for p in parts if p))
    if problems:
        raise DatasetPrepError("; ".join(problems) + ". Nothing was copied. Tick merge to add the new files "
                               "(existing files are kept as they are), or choose another destination")


def _check_space(plans: list[_Plan], dest: Path) -> None:
    needed = sum(path.stat().st_size for plan in plans for path in plan.diff.to_copy)
    free = free_bytes(dest)
    if free is not None and needed > free:
        raise DatasetPrepError(f"copying needs {needed / GIB:.2f} GiB but only {free / GIB:.2f} GiB is free "
                               f"on the drive of {dest}; nothing was copied")


def _execute(plans: list[_Plan], dest: Path) -> None:
    staged = StagedCopy()
    try:
        for plan in plans:
            remove_stale_staging(plan.target.parent)
            if plan.diff.to_copy:
                staged.stage(plan.diff.to_copy, plan.target, merge=plan.existed)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    for name in (LOG, MODEL):
        (dest / name).mkdir(parents=True, exist_ok=True)


def _result(plan: _Plan, merge: bool, dry_run: bool) -> ConceptResult:
    diff, source = plan.diff, plan.source
    if not plan.existed:
        status = "created"
    elif diff.identical:
        status = "unchanged"
    else:
        status = "merged"
    copied = set(diff.to_copy)
    images_copied = sum(1 for path in source.images if path in copied)
    return ConceptResult(
        kind=plan.kind, source=source.folder, folder=plan.target,
        status=("would be " + status) if dry_run else status,
        images=len(source.images), images_copied=images_copied, captions_copied=len(copied) - images_copied,
        uncaptioned=source.uncaptioned, fallback_caption=plan.fallback_caption,
        caption_extension=plan.caption_extension, other_captions=source.other_captions,
        kept_different=diff.different if merge else (), only_in_destination=diff.only_in_destination,
        dry_run=dry_run,
    )
