"""The Dataset Preparation tab's handlers as plain Python: folder preparation and Copy info to the
Folders tab, regularisation images counted and generated (tiny SD1, 64 px), and the caption editor."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
gr = pytest.importorskip("gradio")

from app import captions_actions as captions  # noqa: E402
from app import dataset_actions as actions  # noqa: E402
from app.tab_common import ImageModels  # noqa: E402
from trainer.devtools.synthetic import make_image_folder  # noqa: E402


@pytest.fixture
def sources(tmp_path):
    """Flat source folders as a user has them: 3 training images (2 captioned), 2 class images."""
    make_image_folder(tmp_path / "src", {"photos": 3}, captions="some", seed=1)
    make_image_folder(tmp_path / "src", {"dogs": 2}, captions=False, seed=2)
    return tmp_path / "src" / "photos", tmp_path / "src" / "dogs"


def prep_values(images, reg, dest, **overrides) -> dict:
    values = dict(instance_prompt="sks", class_prompt="dog", images_dir=str(images), repeats=40,
                  reg_images_dir=str(reg) if reg else "", reg_repeats=1, destination=str(dest), merge=False)
    return {**values, **overrides}


def test_prepare_builds_kohya_folders_and_copy_info_fills_the_folders_tab(sources, tmp_path):
    images, reg = sources
    dest = tmp_path / "dataset"
    status, report, settings = actions.prepare(prep_values(images, reg, dest), ".txt")
    assert "Prepared" in status and "Copy info to Folders tab" in status
    assert len([p for p in (dest / "img" / "40_sks dog").iterdir() if p.suffix in (".png", ".jpg")]) == 3
    assert (dest / "reg" / "1_dog").is_dir() and (dest / "log").is_dir() and (dest / "model").is_dir()
    assert "40_sks dog" in report and settings["train_data_dir"] == str(dest.absolute() / "img")

    status, folders = actions.copy_info(str(dest))
    assert folders == {"train_data_dir": str(dest.absolute() / "img"), "reg_data_dir": str(dest.absolute() / "reg"),
                       "output_dir": str(dest.absolute() / "model"), "logging_dir": str(dest.absolute() / "log")}
    assert "Folders tab filled" in status and "nk-warning" not in status
    assert actions.reg_folder_for(str(dest), "dog", 1) == str(dest.absolute() / "reg" / "1_dog")
    assert actions.reg_folder_for(str(dest), "dog", 0).endswith("1_dog")


def test_the_copied_keys_are_widgets_of_the_settings_form():
    from app.widgets import build_settings_tabs

    with gr.Blocks():
        components = build_settings_tabs()
    assert set(actions.FOLDER_KEYS) <= set(components)


def test_preview_writes_nothing_and_refusals_are_status_lines(sources, tmp_path):
    images, reg = sources
    dest = tmp_path / "dataset"
    status, report, settings = actions.prepare(prep_values(images, reg, dest), ".txt", dry_run=True)
    assert "Dry run" in status and "40_sks dog" in report and not dest.exists()
    for overrides, message in (({"instance_prompt": ""}, "Instance prompt"), ({"repeats": None}, "Repeats is empty"),
                               ({"images_dir": str(tmp_path / "none")}, "Training images")):
        status, report, settings = actions.prepare(prep_values(images, reg, dest, **overrides), ".txt")
        assert "Not prepared" in status and message in status and settings == {} and report == ""
    status, folders = actions.copy_info(str(tmp_path / "not prepared"))
    assert "nk-warning" in status and "Prepare training data first" in status and folders["reg_data_dir"] == ""
    assert "destination" in actions.copy_info(" ")[0]


def test_reg_images_are_counted_and_the_missing_ones_generated(tmp_path, tiny_sd1_dir):
    folder = tmp_path / "reg" / "1_dog"
    make_image_folder(tmp_path / "reg", {"1_dog": 1}, captions=False)
    assert "1 regularisation image(s)" in actions.count_reg(str(tmp_path / "reg"), 3)
    assert "2 missing" in actions.count_reg(str(tmp_path / "reg"), 3)

    models, progress = ImageModels(device="cpu"), []
    values = dict(folder=str(tmp_path / "reg"), class_prompt="photo of a dog", total=3, width=64, height=64, steps=2,
                  sampler="euler")
    status = actions.generate_reg(models, str(tiny_sd1_dir), values, {}, lambda *a, **k: progress.append(a[0]))
    assert "Made 2 image(s)" in status and "none missing" in status
    assert len(list(folder.glob("reg_photo_of_a_dog_*.png"))) == 2
    assert progress[-1] == (2, 2)
    assert "none missing" in actions.generate_reg(models, str(tiny_sd1_dir), values, {})

    def stop_after_first(done_total, **_):
        if done_total[0] == 1:
            models.stop_requested.set()

    status = actions.generate_reg(models, str(tiny_sd1_dir), {**values, "total": 6}, {}, stop_after_first)
    assert "Made 1 image(s)" in status and "stopped on request" in status


def test_reg_generation_refusals(tmp_path):
    models = ImageModels(device="cpu")
    values = dict(folder=str(tmp_path / "reg"), class_prompt="dog", total=2, width=64, height=64, steps=2)
    assert "Source Model tab" in actions.generate_reg(models, "", values, {})
    assert "class prompt is needed" in actions.generate_reg(models, "/some/model", {**values, "class_prompt": ""}, {})
    make_image_folder(tmp_path / "two", {"1_dog": 1, "1_cat": 1}, captions=False)
    status = actions.generate_reg(models, "/some/model", {**values, "folder": str(tmp_path / "two"), "total": 5}, {})
    assert "choose the one" in status and "nk-error" in status
    assert "not set" in actions.count_reg("", 3) and not models.loaded


@pytest.fixture
def dataset(tmp_path):
    return make_image_folder(tmp_path / "img", {"10_sks dog": 3, "5_cat": 2}, captions="some", seed=3)


def test_caption_listing_pick_and_save(dataset):
    status, rows, images = captions.listing(str(dataset), ".txt")
    assert "5 image(s) in 2 folder(s)" in status and len(rows) == len(images) == 5
    assert rows[0][:3] == ["000.png", "10_sks dog", "caption file"] and rows[1][2:] == ["folder name", "sks dog"]

    path, preview, caption, source = captions.pick(images, 1, ".txt")
    assert path == images[1] and preview.size[0] <= captions.PREVIEW_SIZE
    assert caption == "sks dog" and "training uses the folder name" in source
    assert "Saved 001.txt" in captions.save(path, "sks dog, running\non grass", ".txt")
    assert (dataset / "10_sks dog" / "001.txt").read_text(encoding="utf-8") == "sks dog, running, on grass"
    assert captions.pick(images, 1, ".txt")[3] == "From 001.txt."
    assert captions.pick(images, 99, ".txt") == ("", None, "", "")
    assert "Pick an image" in captions.save("", "x", ".txt")
    assert "caption extension is empty" in captions.listing(str(dataset), "")[0]


def test_bulk_edits_preview_then_apply_and_tag_counts(dataset):
    status = captions.bulk_edit(str(dataset), captions.ADD_START, "sks", "", ".txt", dry_run=True)
    assert "would change" in status
    before = (dataset / "5_cat" / "000.txt").read_text(encoding="utf-8")
    assert "sks" not in before.split(", ")[0]
    assert "changed" in captions.bulk_edit(str(dataset), captions.ADD_START, "sks", "", ".txt")
    assert (dataset / "5_cat" / "000.txt").read_text(encoding="utf-8").startswith("sks, ")
    captions.bulk_edit(str(dataset), captions.REPLACE, "sks", "ohwx", ".txt")
    captions.bulk_edit(str(dataset), captions.REMOVE, "cat", "", ".txt")
    headers, rows = captions.tag_table(str(dataset), ".txt")
    assert headers == ["tag", "images", "10_sks dog", "5_cat"]
    counts = {row[0]: row[1:] for row in rows}
    assert counts["ohwx"] == [5, 3, 2] and "sks" not in counts and "cat" not in counts
    assert "no tag to add" in captions.bulk_edit(str(dataset), captions.ADD_END, " , ", "", ".txt")
    assert captions.tag_table("", ".txt") == (captions.TAG_HEADERS, [])
