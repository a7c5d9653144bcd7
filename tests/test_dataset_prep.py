"""Folder builder (kohya's "Dreambooth/LoRA Folder preparation"): layout, refusals, re-runs, staging."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from trainer.data.folders import scan_dataset_dir
from trainer.dataset_prep import DatasetPrepError, folder_settings, prepare_training_folders
from trainer.dataset_prep import staging as staging_module
from trainer.dataset_prep.staging import STAGING_PREFIX


def _image(path: Path, shade: int, size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade, 40, 90)).save(path)
    return path


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), to prove a folder was not modified."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def sources(tmp_path):
    train = tmp_path / "photos"
    _image(train / "a.png", 10)
    (train / "a.txt").write_text("sks girl, smiling", encoding="utf-8")
    _image(train / "b.jpg", 20)  # no caption: trains with the folder name
    _image(train / "c.webp", 30)
    (train / "c.caption").write_text("other extension", encoding="utf-8")
    (train / "notes.md").write_text("not part of the dataset")
    (train / ".DS_Store").write_bytes(b"\0\1")
    reg = tmp_path / "girls"
    _image(reg / "r1.png", 40)
    _image(reg / "r2.png", 50)
    return train, reg


def _prepare(train, dest, reg=None, **kwargs):
    return prepare_training_folders(train, dest, "sks", "girl", kwargs.pop("repeats", 40), reg,
                                    kwargs.pop("reg_repeats", 1), ".txt", **kwargs)


def test_layout_files_captions_and_settings(tmp_path, sources):
    train, reg = sources
    before = _tree(tmp_path)
    dest = tmp_path / "out" / "project"

    result = _prepare(train, dest, reg)

    assert sorted(p.name for p in dest.iterdir()) == ["img", "log", "model", "reg"]
    assert [p.name for p in (dest / "img").iterdir()] == ["40_sks girl"]
    assert [p.name for p in (dest / "reg").iterdir()] == ["1_girl"]
    concept = dest / "img" / "40_sks girl"
    assert sorted(p.name for p in concept.iterdir()) == ["a.png", "a.txt", "b.jpg", "c.webp"]
    assert all((concept / name).read_bytes() == (train / name).read_bytes() for name in ("a.png", "a.txt", "b.jpg"))
    assert sorted(p.name for p in (dest / "reg" / "1_girl").iterdir()) == ["r1.png", "r2.png"]
    assert list((dest / "log").iterdir()) == [] and list((dest / "model").iterdir()) == []
    assert result.settings == {
        "train_data_dir": str((dest / "img").absolute()),
        "reg_data_dir": str((dest / "reg").absolute()),
        "output_dir": str((dest / "model").absolute()),
        "logging_dir": str((dest / "log").absolute()),
    }
    t = result.train
    assert (t.status, t.images, t.images_copied, t.captions_copied, t.uncaptioned, t.other_captions) == (
        "created", 3, 3, 1, 2, 1)
    assert (result.reg.status, result.reg.images_copied, result.reg.captions_copied) == ("created", 2, 0)
    assert result.images_copied == 5
    assert "3 image(s) and 1 caption file(s) copied" in result.summary
    assert "train with the caption 'sks girl'" in result.summary
    assert _tree(tmp_path / "photos") == {k[len("photos/"):]: v for k, v in before.items() if k.startswith("photos/")}
    assert _tree(reg) == {k[len("girls/"):]: v for k, v in before.items() if k.startswith("girls/")}

    # the trainer reads the result as kohya would
    scan = scan_dataset_dir(result.settings["train_data_dir"], is_reg=False, caption_extension=".txt")
    assert scan.problems == ()
    (found,) = scan.concepts
    assert (found.repeats, found.name) == (40, "sks girl")
    assert {i.path.name: i.caption for i in found.images} == {
        "a.png": "sks girl, smiling", "b.jpg": "sks girl", "c.webp": "sks girl"}


def test_instance_prompt_ending_with_the_class_is_not_doubled(tmp_path, sources):
    train, _ = sources
    result = prepare_training_folders(train, tmp_path / "dest", "sks girl", "Girl", 10)
    assert [p.name for p in (tmp_path / "dest" / "img").iterdir()] == ["10_sks girl"]
    assert result.train.fallback_caption == "sks girl"
    assert any("already ends with the class" in note for note in result.notes)
    kohya_style = prepare_training_folders(train, tmp_path / "dest2", "ohwx", "girl", 10)
    assert kohya_style.train.folder.name == "10_ohwx girl" and kohya_style.notes == ()


def test_settings_without_reg_folder(tmp_path, sources):
    train, _ = sources
    result = _prepare(train, tmp_path / "dest")
    assert result.reg is None and result.settings["reg_data_dir"] == ""
    assert not (tmp_path / "dest" / "reg").exists()
    assert folder_settings(tmp_path / "dest")["train_data_dir"] == str((tmp_path / "dest" / "img").absolute())


def test_reg_repeats_zero_skips_reg(tmp_path, sources):
    train, reg = sources
    result = _prepare(train, tmp_path / "dest", reg, reg_repeats=0)
    assert result.reg is None and not (tmp_path / "dest" / "reg").exists()
    assert any("repeats is 0" in note for note in result.notes)


@pytest.mark.parametrize("where", ["dest_inside_source", "source_inside_dest", "same", "reg_inside_dest"])
def test_overlapping_folders_are_refused_before_writing(tmp_path, sources, where):
    train, reg = sources
    dest = {"dest_inside_source": train / "prepared", "source_inside_dest": tmp_path, "same": train,
            "reg_inside_dest": tmp_path / "dest"}[where]
    if where == "reg_inside_dest":
        reg = dest / "girls"
        _image(reg / "r.png", 2)
    before = _tree(tmp_path)
    with pytest.raises(DatasetPrepError, match="inside|itself"):
        _prepare(train, dest, reg)
    assert _tree(tmp_path) == before
    assert not any(p.name in ("img", "log", "model") for p in tmp_path.rglob("*"))


def test_overlap_through_a_symlink_is_refused(tmp_path, sources):
    train, _ = sources
    link = tmp_path / "link_to_photos"
    os.symlink(train, link, target_is_directory=True)
    with pytest.raises(DatasetPrepError, match="inside the training images folder"):
        _prepare(train, link / "dest")


def test_same_training_and_reg_source_is_refused(tmp_path, sources):
    train, _ = sources
    with pytest.raises(DatasetPrepError, match="overlap"):
        _prepare(train, tmp_path / "dest", train)


def test_rerun_is_a_no_op_then_new_files_need_merge(tmp_path, sources):
    train, reg = sources
    dest = tmp_path / "dest"
    _prepare(train, dest, reg)
    concept = dest / "img" / "40_sks girl"
    stamps = {p.name: p.stat().st_mtime_ns for p in concept.iterdir()}

    again = _prepare(train, dest, reg)
    assert (again.train.status, again.train.images_copied, again.reg.status) == ("unchanged", 0, "unchanged")
    assert {p.name: p.stat().st_mtime_ns for p in concept.iterdir()} == stamps

    _image(train / "d.png", 60)
    (train / "d.txt").write_text("sks girl, new", encoding="utf-8")
    before = _tree(dest)
    with pytest.raises(DatasetPrepError, match="2 new file") as info:
        _prepare(train, dest, reg)
    assert "merge" in str(info.value)
    assert _tree(dest) == before

    (concept / "a.txt").write_text("sks girl, edited in the destination", encoding="utf-8")
    merged = _prepare(train, dest, reg, merge=True)
    assert (merged.train.status, merged.train.images_copied, merged.train.captions_copied) == ("merged", 1, 1)
    assert merged.train.kept_different == ("a.txt",)
    assert (concept / "a.txt").read_text(encoding="utf-8") == "sks girl, edited in the destination"
    assert (concept / "d.txt").read_text(encoding="utf-8") == "sks girl, new"
    assert merged.reg.status == "unchanged"
    assert not [p for p in (dest / "img").iterdir() if p.name.startswith(".")]


def test_other_repeats_make_a_new_folder_and_a_note(tmp_path, sources):
    train, _ = sources
    dest = tmp_path / "dest"
    _prepare(train, dest)
    result = _prepare(train, dest, repeats=20)
    assert sorted(p.name for p in (dest / "img").iterdir()) == ["20_sks girl", "40_sks girl"]
    assert any("40_sks girl" in note for note in result.notes)


def test_interrupted_copy_leaves_nothing_and_stale_staging_is_cleared(tmp_path, sources, monkeypatch):
    train, reg = sources
    dest = tmp_path / "dest"
    real_copy = staging_module.shutil.copy2
    calls = []

    def failing_copy(src, dst):
        calls.append(src)
        if len(calls) == 5:  # fail in the middle of the reg copy, after the train folder was staged
            raise OSError(28, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(staging_module.shutil, "copy2", failing_copy)
    with pytest.raises(OSError):
        _prepare(train, dest, reg)
    assert list((dest / "img").iterdir()) == [] and list((dest / "reg").iterdir()) == []
    assert not (dest / "log").exists()

    monkeypatch.setattr(staging_module.shutil, "copy2", real_copy)
    stale = dest / "img" / f"{STAGING_PREFIX}40_sks girl-crashed"
    stale.mkdir()
    (stale / "a.png").write_bytes(b"half")
    result = _prepare(train, dest, reg)
    assert result.train.status == "created"
    assert [p.name for p in (dest / "img").iterdir()] == ["40_sks girl"]


def test_dry_run_writes_nothing(tmp_path, sources):
    train, reg = sources
    result = _prepare(train, tmp_path / "dest", reg, dry_run=True)
    assert not (tmp_path / "dest").exists()
    assert result.train.status == "would be created" and result.train.images_copied == 3
    assert result.settings["reg_data_dir"].endswith("reg")
    assert result.summary.startswith("Dry run")


@pytest.mark.parametrize("change, message", [
    ({"instance_prompt": " "}, "Instance prompt is required"),
    ({"class_prompt": "a/b"}, "cannot hold"),
    ({"repeats": 0}, "at least 1"),
    ({"repeats": 2.5}, "whole number"),
    ({"reg_repeats": -1}, "at least 0"),
    ({"destination": ""}, "not set"),
])
def test_bad_requests_are_refused(tmp_path, sources, change, message):
    train, _ = sources
    args = {"images_dir": train, "destination": tmp_path / "dest", "instance_prompt": "sks", "class_prompt": "girl"}
    with pytest.raises(DatasetPrepError, match=message):
        prepare_training_folders(**{**args, **change})
    assert not (tmp_path / "dest").exists()


def test_repeats_from_a_number_box_are_accepted(tmp_path, sources):
    train, _ = sources
    result = prepare_training_folders(train, tmp_path / "dest", "sks", "girl", 40.0)
    assert result.train.folder.name == "40_sks girl"


def test_source_problems_are_explained(tmp_path):
    prepared = tmp_path / "already"
    _image(prepared / "10_sks girl" / "a.png", 1)
    with pytest.raises(DatasetPrepError, match="already prepared"):
        prepare_training_folders(prepared, tmp_path / "dest", "sks", "girl")
    with pytest.raises(DatasetPrepError, match="does not exist"):
        prepare_training_folders(tmp_path / "missing", tmp_path / "dest", "sks", "girl")
