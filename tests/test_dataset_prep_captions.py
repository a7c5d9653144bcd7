"""Caption editor backend: listing, one-caption round trip, bulk tag edits, tag frequencies."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from trainer.data.folders import scan_dataset_dir
from trainer.dataset_prep import (SOURCE_FILE, SOURCE_FOLDER_NAME, SOURCE_NONE, DatasetPrepError, add_tags,
                                  list_captions, read_caption, remove_tags, replace_tag, tag_frequencies,
                                  write_caption)


def _image(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(path)
    return path


def _caption(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def dataset(tmp_path):
    """img/10_sks dog: a (file), b (file), c (folder name); img/2_cat: d (file); a stray folder."""
    img = tmp_path / "img"
    dog, cat = img / "10_sks dog", img / "2_cat"
    for name, shade in (("a.png", 1), ("b.jpg", 2), ("c.webp", 3)):
        _image(dog / name, shade)
    _caption(dog / "a.txt", "sks dog, grass, Sky")
    _caption(dog / "b.txt", "sks dog,grass")
    _image(cat / "d.png", 4)
    _caption(cat / "d.txt", "cat, Grass")
    (img / "notes").mkdir()
    return img


def _texts(root: Path) -> dict[str, str]:
    return {e.image.name: e.text for e in list_captions(root).entries}


def test_listing_says_where_each_caption_comes_from(dataset, tmp_path):
    listing = list_captions(dataset, "txt")
    rows = [(e.folder, e.image.name, e.text, e.source) for e in listing.entries]
    assert rows == [
        ("10_sks dog", "a.png", "sks dog, grass, Sky", SOURCE_FILE),
        ("10_sks dog", "b.jpg", "sks dog,grass", SOURCE_FILE),
        ("10_sks dog", "c.webp", "sks dog", SOURCE_FOLDER_NAME),
        ("2_cat", "d.png", "cat, Grass", SOURCE_FILE),
    ]
    assert listing.ignored_folders == ("notes",)
    assert listing.entries[2].caption_file == dataset / "10_sks dog" / "c.txt"
    assert "4 image(s) in 2 folder(s): 3 captioned by .txt file, 1 by the folder name" in listing.summary

    flat = tmp_path / "raw photos"
    _image(flat / "x.png")
    (entry,) = list_captions(flat).entries
    assert (entry.text, entry.source) == ("", SOURCE_NONE)


def test_one_caption_round_trip_is_atomic_and_leaves_the_image_alone(dataset):
    image = dataset / "10_sks dog" / "c.webp"
    image_bytes = image.read_bytes()

    written = write_caption(image, "sks dog, café, 猫\n  running  \n", ".txt")

    assert (written.text, written.source) == ("sks dog, café, 猫, running", SOURCE_FILE)
    assert (dataset / "10_sks dog" / "c.txt").read_text(encoding="utf-8") == "sks dog, café, 猫, running"
    assert read_caption(image, ".txt") == written
    assert image.read_bytes() == image_bytes
    assert not [p for p in image.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    # the trainer sees the edit
    scan = scan_dataset_dir(dataset, is_reg=False, caption_extension=".txt")
    assert {i.path.name: i.caption for i in scan.images}["c.webp"] == "sks dog, café, 猫, running"


def test_write_caption_refuses_non_images_and_fixes_unreadable_files(dataset):
    with pytest.raises(DatasetPrepError, match="not an image"):
        write_caption(dataset / "10_sks dog" / "a.txt", "x")
    with pytest.raises(DatasetPrepError, match="caption extension is empty"):
        write_caption(dataset / "10_sks dog" / "a.png", "x", "")
    bad = dataset / "2_cat" / "d.txt"
    bad.write_bytes(b"\xff\xfe broken")
    entry = read_caption(dataset / "2_cat" / "d.png")
    assert entry.error and entry.text == ""
    assert "1 caption file(s) cannot be read" in list_captions(dataset).summary
    assert write_caption(dataset / "2_cat" / "d.png", "cat").text == "cat"


def test_add_tags_at_start_and_end_without_duplicates(dataset):
    result = add_tags(dataset, "sks dog, smile", at="start")
    assert _texts(dataset) == {
        "a.png": "smile, sks dog, grass, Sky",
        "b.jpg": "smile, sks dog, grass",
        "c.webp": "smile, sks dog",
        "d.png": "sks dog, smile, cat, Grass",
    }
    assert (len(result.changed), result.created, result.unchanged) == (4, 1, 0)
    assert (dataset / "10_sks dog" / "c.txt").is_file()
    assert "changed 4 caption(s) (1 new caption file(s)" in result.summary

    again = add_tags(dataset, ["SMILE"], at="end")
    assert (len(again.changed), again.unchanged) == (0, 4)
    add_tags(dataset / "2_cat", "outdoors", at="end")
    assert _texts(dataset)["d.png"] == "sks dog, smile, cat, Grass, outdoors"
    assert _texts(dataset)["a.png"] == "smile, sks dog, grass, Sky"


def test_replace_and_remove_tags_case_insensitively(dataset):
    result = replace_tag(dataset, "GRASS", "lawn")
    assert _texts(dataset) == {"a.png": "sks dog, lawn, Sky", "b.jpg": "sks dog, lawn", "c.webp": "sks dog",
                               "d.png": "cat, lawn"}
    assert (len(result.changed), result.created, result.unchanged) == (3, 0, 1)
    assert not (dataset / "10_sks dog" / "c.txt").exists()  # untouched fallback caption stays a fallback

    replace_tag(dataset, "lawn", "sky, grass")  # "sky" is already in a.png: not doubled
    assert _texts(dataset)["a.png"] == "sks dog, grass, Sky"
    assert _texts(dataset)["d.png"] == "cat, sky, grass"

    removed = remove_tags(dataset, "sky, sks dog")
    assert _texts(dataset) == {"a.png": "grass", "b.jpg": "grass", "c.webp": "", "d.png": "cat, grass"}
    assert removed.created == 1  # c.webp's folder-name caption became an (empty) caption file


def test_dry_run_and_unreadable_files(dataset):
    before = {p: p.read_bytes() for p in dataset.rglob("*.txt")}
    preview = remove_tags(dataset, "grass", dry_run=True)
    assert len(preview.changed) == 3 and "would change 3" in preview.summary
    assert {p: p.read_bytes() for p in dataset.rglob("*.txt")} == before

    (dataset / "2_cat" / "d.txt").write_bytes(b"\xff\xfe broken")
    result = remove_tags(dataset, "grass")
    assert len(result.failed) == 1 and "d.txt" in result.failed[0]
    assert (dataset / "2_cat" / "d.txt").read_bytes() == b"\xff\xfe broken"
    with pytest.raises(DatasetPrepError):
        replace_tag(dataset, "grass", " , ")


def test_tag_frequencies_on_a_hand_made_dataset(dataset, tmp_path):
    reg = tmp_path / "reg"
    _image(reg / "1_dog" / "r1.png")
    _image(reg / "1_dog" / "r2.png", 9)
    _caption(reg / "1_dog" / "r1.txt", "dog, grass, grass")

    freq = tag_frequencies(dataset, reg, "", caption_extension=".txt")

    assert freq.per_folder == {
        "10_sks dog": {"sks dog": 3, "grass": 2, "sky": 1},
        "1_dog": {"dog": 2, "grass": 2},
        "2_cat": {"cat": 1, "grass": 1},
    }
    assert list(freq.per_folder["10_sks dog"]) == ["sks dog", "grass", "sky"]  # most frequent first
    assert list(freq.overall.items()) == [("grass", 5), ("sks dog", 3), ("dog", 2), ("cat", 1), ("sky", 1)]
    assert freq.images_per_folder == {"10_sks dog": 3, "1_dog": 2, "2_cat": 1} and freq.images == 6
    assert freq.summary.splitlines()[1] == "overall: grass (5), sks dog (3), dog (2), cat (1), sky (1)"
    assert "... 1 more" in freq.describe(top=4)


def test_tag_frequencies_match_the_saved_lora_metadata(dataset):
    """Same numbers as the trainer's ss_tag_frequency, which is computed from its own folder scan."""
    from trainer.network.metadata import tag_frequency

    scan = scan_dataset_dir(dataset, is_reg=False, caption_extension=".txt")
    captions: dict[str, list[str]] = {}
    for item in scan.images:
        captions.setdefault(item.folder, []).append(item.caption)
    saved = json.loads(json.dumps({folder: tag_frequency(texts) for folder, texts in captions.items()}))
    assert tag_frequencies(dataset).per_folder == saved
