"""Regularisation images: the missing ones are generated from the base model; existing ones are kept."""
from __future__ import annotations

import pytest
from PIL import Image

from trainer.inference import TryIt, existing_images, generate_reg_images


@pytest.fixture(scope="module")
def tryit():
    return TryIt(device="cpu")


def reg_args(**overrides):
    args = dict(size=(64, 64), steps=2, cfg_scale=5.0, sampler="euler", seed=100)
    args.update(overrides)
    return args


@pytest.mark.slow
def test_fills_the_folder_up_to_the_count_and_keeps_what_is_there(tiny_sd1_dir, tryit, tmp_path):
    folder = tmp_path / "reg" / "1_dog"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(folder / "mine.png")
    Image.new("RGB", (80, 64), "blue").save(folder / "also mine.jpg")
    (folder / "notes.txt").write_text("not an image")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    progress = []
    made = generate_reg_images(str(tiny_sd1_dir), folder, "a photo of a dog", 4, tryit=tryit,
                               progress=lambda done, total: progress.append((done, total)), **reg_args())
    assert [p.name for p in made] == ["reg_a_photo_of_a_dog_100.png", "reg_a_photo_of_a_dog_101.png"]
    assert progress == [(0, 2), (1, 2), (2, 2)]
    assert all((folder / name).read_bytes() == data for name, data in before.items())
    assert len(existing_images(folder)) == 4
    for path, seed in zip(made, (100, 101)):
        with Image.open(path) as image:
            assert image.size == (64, 64)
            assert image.text["parameters"].startswith("a photo of a dog\n")
            assert f"Seed: {seed}," in image.text["parameters"]
    assert generate_reg_images(str(tiny_sd1_dir), folder, "a photo of a dog", 4, tryit=tryit, **reg_args()) == []
    assert generate_reg_images(str(tiny_sd1_dir), folder, "a photo of a dog", 3, tryit=tryit, **reg_args()) == []


@pytest.mark.slow
def test_new_folder_other_size_and_no_name_clash(tiny_sd1_dir, tryit, tmp_path):
    folder = tmp_path / "new" / "1_cat"
    made = generate_reg_images(str(tiny_sd1_dir), folder, "cat", 1, tryit=tryit, **reg_args(size=(72, 64)))
    assert [p.name for p in made] == ["reg_cat_100.png"] and Image.open(made[0]).size == (72, 64)
    made_again = generate_reg_images(str(tiny_sd1_dir), folder, "cat", 2, tryit=tryit, **reg_args())  # same seed
    assert [p.name for p in made_again] == ["reg_cat_100-1.png"] and Image.open(made_again[0]).size == (64, 64)


def test_stop_keeps_what_was_made_and_a_class_prompt_is_needed(tiny_sd1_dir, tryit, tmp_path):
    calls = []
    made = generate_reg_images(str(tiny_sd1_dir), tmp_path, "dog", 5, tryit=tryit,
                               should_stop=lambda: calls.append(1) or len(calls) > 1, **reg_args())
    assert len(made) == 1 and len(existing_images(tmp_path)) == 1
    with pytest.raises(ValueError, match="class prompt"):
        generate_reg_images(str(tiny_sd1_dir), tmp_path, "  ", 3, tryit=tryit, **reg_args())
    assert generate_reg_images(str(tiny_sd1_dir), tmp_path, "", 1, tryit=tryit, **reg_args()) == []  # nothing missing
