"""Preflight dataset checks: layout, unreadable and tiny images, captions, and the image cache."""
from __future__ import annotations

import io
import shutil

import pytest
from PIL import Image

from test_preflight_support import big_cpu, problems, settings
from trainer.devtools.synthetic import add_corrupt_image, add_tiny_image, make_image_folder
from trainer.preflight import check
from trainer.preflight import device as device_module
from trainer.preflight import image_check


@pytest.fixture(autouse=True)
def fixed_device(monkeypatch):
    monkeypatch.setattr(device_module, "probe_device", big_cpu)


@pytest.fixture
def model(tiny_sd1_file):
    return tiny_sd1_file


def only(report, field):
    return [p for p in report.errors if p.field == field]


def test_valid_dataset_has_no_dataset_problems(tmp_path, model):
    report = check(settings(tmp_path, model))
    assert report.ok, report.format()
    assert not report.warnings, report.format()
    assert report.plan.total_steps == (3 * 10 + 2 * 5)


def test_image_folder_not_set_missing_or_a_file(tmp_path, model):
    assert "not set" in only(check(settings(tmp_path, model, train_data_dir="")), "train_data_dir")[0].message
    missing = tmp_path / "nope"
    [error] = only(check(settings(tmp_path, model, train_data_dir=str(missing))), "train_data_dir")
    assert str(missing) in error.message and "does not exist" in error.message
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    [error] = only(check(settings(tmp_path, model, train_data_dir=str(a_file))), "train_data_dir")
    assert "is a file" in error.message


def test_empty_image_folder(tmp_path, model):
    empty = tmp_path / "empty"
    empty.mkdir()
    [error] = only(check(settings(tmp_path, model, train_data_dir=str(empty))), "train_data_dir")
    assert "is empty" in error.message and "<repeats>_<name>" in error.message


def test_leaf_folder_named_like_a_concept_points_at_the_parent(tmp_path, model):
    make_image_folder(tmp_path / "data", {"10_sks dog": 3})
    leaf = tmp_path / "data" / "10_sks dog"
    [error] = only(check(settings(tmp_path, model, train_data_dir=str(leaf))), "train_data_dir")
    assert "3 images directly" in error.message and "parent" in error.message
    assert str(tmp_path / "data") in error.fix


def test_leaf_folder_with_plain_name_suggests_a_subfolder(tmp_path, model):
    make_image_folder(tmp_path / "data", {"10_photos": 2})
    plain = tmp_path / "photos"
    shutil.move(str(tmp_path / "data" / "10_photos"), plain)
    [error] = only(check(settings(tmp_path, model, train_data_dir=str(plain))), "train_data_dir")
    assert "10_photos" in error.fix


def test_subfolders_without_repeats_and_grandparent(tmp_path, model):
    make_image_folder(tmp_path / "a", {"dog": 2})
    [error] = only(check(settings(tmp_path, model, train_data_dir=str(tmp_path / "a"))), "train_data_dir")
    assert "'dog'" in error.message and "'dog' -> '10_dog'" in error.fix
    make_image_folder(tmp_path / "b" / "img", {"10_dog": 2})
    [error] = only(check(settings(tmp_path, model, train_data_dir=str(tmp_path / "b"))), "train_data_dir")
    assert str(tmp_path / "b" / "img") in error.fix


def test_concept_folder_without_images(tmp_path, model):
    (tmp_path / "c" / "10_dog").mkdir(parents=True)
    [error] = only(check(settings(tmp_path, model, train_data_dir=str(tmp_path / "c"))), "train_data_dir")
    assert "10_dog" in error.message and "no usable images" in error.message


def test_loose_images_and_ignored_folders_are_warnings_next_to_concepts(tmp_path, model):
    s = settings(tmp_path, model)
    root = tmp_path / "img"
    Image.new("RGB", (64, 64)).save(root / "loose.png")
    make_image_folder(root, {"notes": 1})
    report = check(s)
    messages = [p.message for p in problems(report, "warning", "train_data_dir")]
    assert any("1 image lie directly" in m for m in messages), messages
    assert any("'notes' is ignored" in m for m in messages), messages
    assert report.ok


def test_unreadable_image_is_named_and_policy_decides_severity(tmp_path, model):
    s = settings(tmp_path, model)
    bad = add_corrupt_image(tmp_path / "img" / "10_sks dog", "broken.png")
    [error] = [p for p in check(s).errors if p.file == str(bad)]
    assert error.field == "train_data_dir" and "broken.png" in error.message and "skip" in error.fix
    report = check(s.model_copy(update={"bad_image_policy": "skip"}))
    assert report.ok and any(p.file == str(bad) and "left out" in p.message for p in report.warnings)


def test_truncated_image_with_a_good_header_is_caught_by_decoding(tmp_path, model):
    s = settings(tmp_path, model)
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, "JPEG", quality=95)
    path = tmp_path / "img" / "5_cat" / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 3 // 4])
    [error] = [p for p in check(s).errors if p.file == str(path)]
    assert "cut.jpg: cannot be decoded" in error.message and "truncated" in error.message


def test_tiny_and_small_images_are_named(tmp_path, model):
    s = settings(tmp_path, model, max_resolution="256,256", max_bucket_reso=512, bucket_no_upscale=False)
    folder = tmp_path / "img" / "5_cat"
    tiny = add_tiny_image(folder, "tiny.png", size=(40, 40))
    report = check(s)
    [error] = [p for p in report.errors if p.file == str(tiny)]
    assert "tiny.png: too small to train (40x40 px" in error.message
    small = [p for p in report.warnings if "small for 256x256" in p.message]
    assert small and all(p.file and p.file.split("/")[-1] in p.message for p in small)
    assert any("enlarged" in p.message for p in small)


def test_image_no_bucket_fits_is_named_as_left_out(tmp_path, model):
    s = settings(tmp_path, model)  # bucket_no_upscale: an 8x8 image fits no 64-step bucket
    tiny = add_tiny_image(tmp_path / "img" / "5_cat", "dot.png", size=(8, 8))
    [warning] = [p for p in check(s).warnings if p.file == str(tiny)]
    assert "left out" in warning.message and "dot.png" in warning.message


def test_many_bad_images_are_named_up_to_a_limit_then_counted(tmp_path, model):
    s = settings(tmp_path, model)
    for i in range(23):
        add_corrupt_image(tmp_path / "img" / "10_sks dog", f"bad{i:02d}.png")
    bad = [p for p in check(s).errors if p.field == "train_data_dir"]
    assert len(bad) == 21 and "3 more images" in bad[-1].message


def test_captions_missing_empty_and_wrong_extension(tmp_path, model):
    s = settings(tmp_path, model)
    make_image_folder(tmp_path / "img", {"10_some": 4}, captions="some")
    make_image_folder(tmp_path / "img", {"5_none": 2}, captions=False)
    make_image_folder(tmp_path / "img", {"3_caps": 2}, caption_extension=".caption")
    (tmp_path / "img" / "10_sks dog" / "000.txt").write_text("")
    report = check(s)
    text = {p.message for p in report.problems}
    assert any(m.startswith("10_some: 2 of 4 images have no .txt caption file") and "'some'" in m for m in text), text
    assert any(m.startswith("5_none: no caption files") and "'none'" in m for m in text), text
    assert any("1 caption file is empty (000.png)" in m for m in text), text
    [wrong] = problems(report, "warning", "caption_extension")
    assert "3_caps" in wrong.message and "'.caption'" in wrong.fix


def test_regularisation_folder_checked_like_the_image_folder(tmp_path, model):
    [error] = only(check(settings(tmp_path, model, reg_data_dir=str(tmp_path / "noreg"))), "reg_data_dir")
    assert "does not exist" in error.message
    make_image_folder(tmp_path / "reg", {"1_dog": 2})
    leaf = tmp_path / "reg" / "1_dog"
    [error] = only(check(settings(tmp_path, model, reg_data_dir=str(leaf))), "reg_data_dir")
    assert "parent" in error.message
    report = check(settings(tmp_path, model, reg_data_dir=str(tmp_path / "reg")))
    assert report.ok and report.plan.reg_images == 2


def test_quick_check_decodes_within_budget_and_caches_verdicts(tmp_path, model):
    s = settings(tmp_path, model)
    image_check.clear_cache()
    quick = check(s, deep=False, image_budget_s=0.0)
    assert quick.unverified_images == 5 and "not decoded yet" in quick.format()
    assert check(s).unverified_images == 0
    assert check(s, deep=False, image_budget_s=0.0).unverified_images == 0  # all cached now


def test_cached_verdict_is_refreshed_when_the_file_changes(tmp_path, model):
    s = settings(tmp_path, model)
    assert check(s).ok
    victim = tmp_path / "img" / "5_cat" / "001.jpg"
    data = victim.read_bytes()
    buffer = io.BytesIO()
    Image.effect_noise((96, 64), 64).convert("RGB").save(buffer, "JPEG", quality=95)
    victim.write_bytes(buffer.getvalue()[:-300])  # new size and mtime, header intact, data cut
    assert any(p.file == str(victim) for p in check(s).errors)
    victim.write_bytes(data)
    assert check(s).ok


def test_verdicts_persist_across_processes(tmp_path, model, monkeypatch):
    s = settings(tmp_path, model)
    image_check.clear_cache(disk=True)
    assert check(s).ok
    image_check.clear_cache()  # a new process: memory empty, the saved file remains
    image_check._disk_loaded = False
    monkeypatch.setattr(image_check, "decode_problem", lambda path: pytest.fail(f"decoded {path} again"))
    assert check(s).ok
