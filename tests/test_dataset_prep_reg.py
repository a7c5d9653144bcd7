"""Regularisation image count against the requested total (and where to generate the rest); dataset balancing."""
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


def test_balancing_plans_and_renames_concept_folders(tmp_path):
    from trainer.dataset_prep import apply_balance, plan_balance

    img = tmp_path / "img"
    _files(img / "10_a", *[f"{i}.png" for i in range(5)])
    _files(img / "20_a", *[f"{i}.png" for i in range(4)])  # becomes 25_a while 10_a becomes 20_a
    _files(img / "1_b", *[f"{i}.jpg" for i in range(20)], "0.txt")
    _files(img / "3_c")
    _files(img / "notes", "x.png")

    plan = plan_balance(img, 100)
    assert [(c.folder.name, c.images, c.new_repeats, c.steps) for c in plan.concepts] == [
        ("10_a", 5, 20, 100), ("1_b", 20, 5, 100), ("20_a", 4, 25, 100)]
    assert plan.empty_folders == ("3_c",)
    assert sorted(p.name for p in img.iterdir()) == ["10_a", "1_b", "20_a", "3_c", "notes"]  # planning renames nothing

    after = apply_balance(plan)
    assert sorted(p.name for p in img.iterdir()) == ["20_a", "25_a", "3_c", "5_b", "notes"]
    assert len(list((img / "20_a").iterdir())) == 5 and (img / "5_b" / "0.txt").is_file()
    assert after.renames == () and "(unchanged)" in after.summary

    _files(img / "7_y", "1.png", "2.png")
    _files(img / "9_y", "1.png", "2.png")
    before = sorted(p.name for p in img.iterdir())
    with pytest.raises(DatasetPrepError, match="50_y"):
        apply_balance(plan_balance(img, 100))
    assert sorted(p.name for p in img.iterdir()) == before
