"""Regularisation image count against the requested total, and where missing ones would be generated."""
from __future__ import annotations

from pathlib import Path

import pytest

from trainer.dataset_prep import DatasetPrepError, count_reg_images


def _files(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")  # counted by extension, never decoded


def test_counts_class_folders_and_targets_the_only_one(tmp_path):
    _files(tmp_path / "reg" / "1_girl", "a.png", "b.JPG", "c.webp", "a.txt", ".d.png")
    _files(tmp_path / "reg" / "notes", "x.png")  # not a <repeats>_<class> folder: not counted

    count = count_reg_images(tmp_path / "reg", 10)

    assert (count.existing, count.requested, count.missing) == (3, 10, 7)
    assert count.per_folder == {"1_girl": 3}
    assert count.target_folder == tmp_path / "reg" / "1_girl"
    assert "7 missing, to be generated into" in count.summary
    enough = count_reg_images(tmp_path / "reg", 3.0)
    assert enough.missing == 0 and "none missing" in enough.summary


def test_flat_missing_and_ambiguous_folders(tmp_path):
    _files(tmp_path / "flat", "a.png", "b.png")
    flat = count_reg_images(tmp_path / "flat", 5)
    assert (flat.existing, flat.missing, flat.target_folder) == (2, 3, tmp_path / "flat")

    new = count_reg_images(tmp_path / "not yet", 4)
    assert (new.existing, new.missing, new.target_folder) == (0, 4, tmp_path / "not yet")

    _files(tmp_path / "two" / "1_girl", "a.png")
    _files(tmp_path / "two" / "1_boy", "a.png", "b.png")
    two = count_reg_images(tmp_path / "two", 10)
    assert two.per_folder == {"1_boy": 2, "1_girl": 1} and two.missing == 7
    assert two.target_folder is None and "choose the one" in two.summary


@pytest.mark.parametrize("folder, total, message", [
    ("reg", -1, "at least 0"),
    ("reg", 2.5, "whole number"),
    ("", 10, "not set"),
])
def test_bad_requests(tmp_path, folder, total, message):
    with pytest.raises(DatasetPrepError, match=message):
        count_reg_images(str(tmp_path / folder) if folder else "", total)
