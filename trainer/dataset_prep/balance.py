"""kohya's "Dataset balancing": repeats per concept folder so each gives about the same steps per epoch.

``plan_balance`` only computes (repeats = max(1, round(steps / images)), as
kohya); ``apply_balance`` renames the ``<repeats>_<name>`` folders. Renaming
never touches the images; a rename whose new name is already taken is refused
before any folder is renamed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trainer.data.folders import is_image_file, parse_concept_folder_name

from .layout import DatasetPrepError, check_repeats


@dataclass(frozen=True)
class ConceptBalance:
    folder: Path
    name: str
    images: int
    repeats: int  # now
    new_repeats: int

    @property
    def new_folder(self) -> Path:
        return self.folder.with_name(f"{self.new_repeats}_{self.name}")

    @property
    def steps(self) -> int:
        return self.images * self.new_repeats


@dataclass(frozen=True)
class BalancePlan:
    root: Path
    steps_per_concept: int
    concepts: tuple[ConceptBalance, ...]
    empty_folders: tuple[str, ...]  # concept folders without images: left as they are

    @property
    def renames(self) -> tuple[ConceptBalance, ...]:
        return tuple(c for c in self.concepts if c.new_repeats != c.repeats)

    @property
    def summary(self) -> str:
        lines = [f"{len(self.concepts)} concept folder(s), about {self.steps_per_concept} steps each per epoch:"]
        lines += [f"  {c.folder.name}: {c.images} image(s) x {c.new_repeats} = {c.steps}"
                  + (f" (rename to {c.new_folder.name})" if c in self.renames else " (unchanged)")
                  for c in self.concepts]
        if self.empty_folders:
            lines.append(f"  no images, left as they are: {', '.join(self.empty_folders)}")
        return "\n".join(lines)


def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def plan_balance(train_data_dir: str | os.PathLike, steps_per_concept=1000) -> BalancePlan:
    steps = check_repeats("Training steps per concept per epoch", steps_per_concept, 1)
    root = Path(train_data_dir).expanduser() if train_data_dir else None
    if root is None or not root.is_dir():
        raise DatasetPrepError(f"the image folder does not exist or is not a folder: {train_data_dir}")
    concepts, empty = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        parsed = parse_concept_folder_name(folder.name)
        if parsed is None:
            continue
        images = _count_images(folder)
        if not images:
            empty.append(folder.name)
            continue
        concepts.append(ConceptBalance(folder, parsed[1], images, parsed[0], max(1, round(steps / images))))
    if not concepts:
        raise DatasetPrepError(f"no <repeats>_<name> folder with images in {root}")
    return BalancePlan(root, steps, tuple(concepts), tuple(empty))


def apply_balance(plan: BalancePlan) -> BalancePlan:
    """Rename the folders of ``plan``; returns the plan for the renamed folders."""
    renames = plan.renames
    targets = [c.new_folder for c in renames]
    moving = {c.folder for c in renames}
    clashes = sorted({t.name for t in targets if (t.exists() and t not in moving) or targets.count(t) > 1})
    if clashes:
        raise DatasetPrepError(f"cannot rename: {', '.join(clashes)} already exist(s) or would be made twice "
                               f"in {plan.root}; merge or rename those folders first. Nothing was renamed")
    missing = [c.folder.name for c in renames if not c.folder.is_dir()]
    if missing:
        raise DatasetPrepError(f"{', '.join(missing)} no longer exist(s) in {plan.root}; plan again")
    # Renaming one folder onto another moving folder's old name could clash mid-way: go through temp names.
    staged = [(c.folder.with_name(f".nekoya-balance-{i}-{c.folder.name}"), c.new_folder) for i, c in enumerate(renames)]
    for (temp, _), concept in zip(staged, renames):
        os.rename(concept.folder, temp)
    for temp, final in staged:
        os.rename(temp, final)
    return plan_balance(plan.root, plan.steps_per_concept)
