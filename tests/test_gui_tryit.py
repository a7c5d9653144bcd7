"""The Try it tab's handlers as plain Python: prefilled base model and LoRA, generate and compare on
the tiny SD1 model (64 px, 2 steps), notes and refusals."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
pytest.importorskip("gradio")

from test_gui_lora_lists import lora_file  # noqa: E402
from test_tools_support import one_thread, random_lora  # noqa: E402,F401  (fixture)

from app import tab_tryit as tryit  # noqa: E402
from app.tab_common import ImageModels, follow, lora_files, saved_lora_paths  # noqa: E402
from trainer.events import Saved  # noqa: E402


@pytest.fixture(scope="module")
def models():
    return ImageModels(device="cpu")


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_sd1_dir):
    folder = tmp_path_factory.mktemp("gui_tryit")
    return [random_lora(folder, tiny_sd1_dir, f"epoch{i}", seed=i, std=0.3) for i in (6, 10)]


def values(model, **overrides) -> dict:
    base = dict(base_model=str(model), lora="", weight=0.8, prompt="photo of sks dog", negative_prompt="blurry",
                width=64, height=64, steps=2, cfg_scale=5.0, seed=11, count=1, sampler="euler",
                compare_with=tryit.COMPARE_FILES, lora_b="", weight_b=0.8)
    return {**base, **overrides}


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_fields_follow_their_source_until_the_user_types_something_else():
    assert follow("", None, "/m/a") == "/m/a"
    assert follow("/m/a", "/m/a", "/m/b") == "/m/b"  # still the prefilled value: follows
    assert follow("/mine", "/m/a", "/m/b") == "/mine"  # typed by the user: kept
    base, lora, choices, prefilled = tryit.prefill({}, " /m/model ", [], "", "", "")
    assert (base, lora, choices) == ("/m/model", "", [])
    base, _, _, _ = tryit.prefill(prefilled, "/m/other", [], "", base, "")
    assert base == "/m/other"


def test_the_newest_saved_lora_is_offered_first_then_the_output_folder(tmp_path):
    older, newer = tmp_path / "run-000001.safetensors", tmp_path / "run.safetensors"
    lora_file(tmp_path / "loose.safetensors", 1)  # a LoRA of an earlier run (read as one from its header)
    snapshot = SimpleNamespace(saved=(Saved(str(older), "epoch", 1, 1), Saved(str(tmp_path / "state"), "state", 2, 2),
                                      Saved(str(newer), "final", 2, 2)))
    saved = saved_lora_paths(snapshot)
    assert saved == [str(older), str(newer)]
    for path in (older, newer):
        path.write_bytes(b"x")
    assert lora_files(saved, str(tmp_path)) == [str(newer), str(older), str(tmp_path / "loose.safetensors")]
    _, lora, choices, prefilled = tryit.prefill({}, "", saved, str(tmp_path), "", "")
    assert lora == str(newer) and choices[0] == str(newer)
    _, lora, _, _ = tryit.prefill(prefilled, "", saved, "", "/picked/by/me.safetensors", "/picked/by/me.safetensors")
    assert lora == "/picked/by/me.safetensors"


def test_generate_gives_the_seeded_images_with_a_note(models, tiny_sd1_dir, loras):
    progress = []
    items, note, columns = tryit.generate_images(models, values(tiny_sd1_dir, lora=str(loras[0]), count=2), {},
                                                 lambda *a, **k: progress.append(a[0]))
    assert len(items) == 2 and columns == 2
    assert [caption for _, caption in items] == ["epoch6 @ 0.8 · seed 11", "epoch6 @ 0.8 · seed 12"]
    assert items[0][0].size == (64, 64)
    assert "2 image(s)" in note and "seed 11, 12" in note and "nk-ok" in note
    assert (4, 4) in progress  # 2 images x 2 steps, as (done, total)
    again, _, _ = tryit.generate_images(models, values(tiny_sd1_dir, lora=str(loras[0])), {})
    assert np.array_equal(pixels(again[0][0]), pixels(items[0][0]))


def test_compare_two_files_two_weights_and_the_base_with_one_seed(models, tiny_sd1_dir, loras):
    a, b = str(loras[0]), str(loras[1])
    files, _, columns = tryit.generate_images(models, values(tiny_sd1_dir, lora=a, lora_b=b), {}, compare=True)
    assert columns == 2 and [c for _, c in files] == ["epoch6 @ 0.8 · seed 11", "epoch10 @ 0.8 · seed 11"]
    assert not np.array_equal(pixels(files[0][0]), pixels(files[1][0]))

    weights, _, _ = tryit.generate_images(models, values(tiny_sd1_dir, lora=a, compare_with=tryit.COMPARE_WEIGHTS,
                                                         weight_b=0.0), {}, compare=True)
    base, _, _ = tryit.generate_images(models, values(tiny_sd1_dir, lora=a, compare_with=tryit.COMPARE_BASE), {},
                                       compare=True)
    assert [c for _, c in weights] == ["epoch6 @ 0.8 · seed 11", "epoch6 @ 0 · seed 11"]
    assert np.array_equal(pixels(weights[0][0]), pixels(files[0][0]))
    assert np.array_equal(pixels(weights[1][0]), pixels(base[1][0]))  # weight 0 is the base model
    assert base[1][1] == "base model · seed 11"


@pytest.mark.parametrize("overrides, compare, message", [
    ({"base_model": " "}, False, "Choose the base model"),
    ({"prompt": ""}, False, "Type a prompt"),
    ({"lora_b": ""}, True, "Choose the second LoRA file"),
    ({"lora": "", "compare_with": tryit.COMPARE_WEIGHTS}, True, "Choose the LoRA file to compare"),
    ({"lora": "/nowhere/missing.safetensors"}, False, "Not generated"),
    ({"base_model": "/nowhere/model"}, False, "Not generated"),
    ({"steps": None}, False, "Steps is empty"),
])
def test_refusals_are_notes(models, tiny_sd1_dir, overrides, compare, message):
    items, note, _ = tryit.generate_images(models, values(tiny_sd1_dir, **overrides), {}, compare=compare)
    assert items == [] and message in note and "nk-error" in note


def test_unloading_frees_the_cached_model(tiny_sd1_dir):
    models = ImageModels(device="cpu")
    assert models.unload() == "No model was loaded."
    models.tryit.load(str(tiny_sd1_dir))
    assert models.loaded
    assert "unloaded" in models.unload() and not models.loaded
