"""Folder scanning: kohya naming, captions, header-only sizes, and what is skipped and why."""
from pathlib import Path

from PIL import Image

from trainer.data.folders import (
    normalise_caption_extension,
    parse_concept_folder_name,
    read_image_size,
    scan_dataset_dir,
)


def _image(path: Path, size=(64, 48), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_parse_concept_folder_name_like_sd_scripts():
    assert parse_concept_folder_name("10_sks dog") == (10, "sks dog")
    assert parse_concept_folder_name("3_a_b c") == (3, "a_b c")
    assert parse_concept_folder_name("5") == (5, "")
    assert parse_concept_folder_name("0_x") == (0, "x")
    assert parse_concept_folder_name("dog_10") is None
    assert parse_concept_folder_name(".cache") is None


def test_caption_extension_gets_a_dot():
    assert normalise_caption_extension("txt") == ".txt"
    assert normalise_caption_extension(".caption") == ".caption"
    assert normalise_caption_extension("") == ""


def test_scan_reads_captions_class_tokens_and_sizes(tmp_path):
    concept = tmp_path / "10_sks dog"
    _image(concept / "b.png", (64, 48))
    _image(concept / "a.JPG", (32, 80))
    _image(concept / "c.webp", (40, 40))
    (concept / "a.txt").write_text("sks dog, running\nsecond line ignored\n", encoding="utf-8")
    (concept / "c.txt").write_bytes("\ufeffsks dog, bom".encode("utf-8"))
    (concept / "notes.md").write_text("not an image")

    result = scan_dataset_dir(tmp_path, is_reg=False, caption_extension="txt")

    assert result.problems == ()
    assert len(result.concepts) == 1
    found = result.concepts[0]
    assert (found.name, found.repeats, found.captions_found, found.samples) == ("sks dog", 10, 2, 30)
    items = {item.path.name: item for item in found.images}
    assert list(items) == ["a.JPG", "b.png", "c.webp"]  # sorted, any extension case
    assert (items["a.JPG"].width, items["a.JPG"].height) == (32, 80)
    assert items["a.JPG"].caption == "sks dog, running"
    assert items["c.webp"].caption == "sks dog, bom"  # BOM removed
    assert items["b.png"].caption == "sks dog" and not items["b.png"].caption_from_file
    assert all(item.repeats == 10 and not item.is_reg and item.folder == "10_sks dog" for item in found.images)
    assert any("1 of 3 images have no .txt file" in w for w in result.warnings)


def test_scan_skips_and_reports(tmp_path):
    _image(tmp_path / "nodigits" / "x.png")
    _image(tmp_path / "0_zero" / "x.png")
    (tmp_path / "2_empty").mkdir()
    _image(tmp_path / "3_ok" / "good.png")
    (tmp_path / "3_ok" / "broken.png").write_bytes(b"not a png at all")
    _image(tmp_path / "3_ok" / "badcap.png")
    (tmp_path / "3_ok" / "badcap.txt").write_bytes(b"\xff\xfe caption in latin-1 \xe9")
    _image(tmp_path / "loose.png")

    result = scan_dataset_dir(tmp_path, is_reg=True, caption_extension=".txt")

    reasons = {s.path.name: s.reason for s in result.skipped}
    assert "'<repeats>_'" in reasons["nodigits"]
    assert "at least 1" in reasons["0_zero"]
    assert "no usable images" in reasons["2_empty"]
    assert "cannot read image header" in reasons["broken.png"]
    assert "not valid UTF-8" in reasons["badcap.txt"]
    assert [i.path.name for i in result.images] == ["good.png"]
    assert result.images[0].is_reg and result.images[0].caption == "ok"
    assert any("lie directly in reg_data_dir" in p for p in result.problems)


def test_scan_missing_or_unset_root(tmp_path):
    assert "does not exist" in scan_dataset_dir(tmp_path / "nope", is_reg=False, caption_extension=".txt").problems[0]
    assert "not set" in scan_dataset_dir("", is_reg=False, caption_extension=".txt").problems[0]
    _image(tmp_path / "leaf.png")  # user pointed at the image folder itself
    problems = scan_dataset_dir(tmp_path, is_reg=False, caption_extension=".txt").problems
    assert any("must be the parent of folders" in p for p in problems)
    assert any("no images found" in p for p in problems)


def test_exif_rotation_swaps_header_size(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    Image.new("RGB", (80, 40)).save(path, exif=exif.tobytes())
    assert read_image_size(path) == (40, 80)


def test_empty_caption_file_is_an_empty_caption_with_a_warning(tmp_path):
    _image(tmp_path / "1_cls" / "a.png")
    (tmp_path / "1_cls" / "a.caption").write_text("")
    result = scan_dataset_dir(tmp_path, is_reg=False, caption_extension=".caption")
    assert result.images[0].caption == "" and result.images[0].caption_from_file
    assert any("empty" in w for w in result.warnings)
