"""Try it and Tools list every LoRA in the Output folder, newest first, also in a freshly built app (as after
a restart, when no run has saved anything yet): through the app's own handlers for the 🔄 button, the output
folder's change and the tab's selection."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
gr = pytest.importorskip("gradio")
from gui_app_support import component, fresh_app, run_handlers  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402


def lora_file(path, stamp: int):
    save_file({"lora_unet_mid_block_attn.lora_down.weight": np.zeros((4, 8), np.float32),
               "lora_unet_mid_block_attn.lora_up.weight": np.zeros((8, 4), np.float32)}, str(path))
    os.utime(path, (stamp, stamp))
    return str(path)


@pytest.fixture
def output_folder(tmp_path):
    """Two runs' epochs, the newest in the middle of the alphabet, and files that are not LoRAs."""
    folder = tmp_path / "out"
    folder.mkdir()
    files = [lora_file(folder / name, stamp) for name, stamp in
             (("old_run-000001.safetensors", 1000), ("old_run.safetensors", 2000), ("new_run-000001.safetensors", 3000))]
    save_file({"model.diffusion_model.conv_in.weight": np.zeros((4, 4), np.float32)}, str(folder / "merged.safetensors"))
    (folder / "broken.safetensors").write_bytes(b"x")
    (folder / "notes.txt").write_text("hello")
    (folder / "new_run-state").mkdir()
    return str(folder), files[::-1]  # newest first


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return fresh_app(tmp_path_factory.mktemp("presets"))


def choices_of(results: list[dict], dropdown) -> list[str]:
    updates = [r[dropdown] for r in results if isinstance(r, dict) and dropdown in r]
    assert len(updates) == 1
    return list(updates[0]["choices"])


@pytest.mark.parametrize("trigger, event", [("tryit_refresh_loras", "click"), ("tab_try_it", "select"),
                                            ("setting_output_dir", "change")])
def test_try_it_lists_every_lora_of_the_output_folder_newest_first(app, output_folder, trigger, event):
    folder, newest_first = output_folder
    output_dir, lora = component(app, "setting_output_dir"), component(app, "tryit_lora")
    results = run_handlers(app, component(app, trigger), event, {output_dir: folder})
    assert choices_of(results, lora) == newest_first
    assert next(r[lora]["value"] for r in results if isinstance(r, dict) and lora in r) == newest_first[0]
    assert choices_of(results, component(app, "tryit_lora_b")) == newest_first


@pytest.mark.parametrize("trigger, event", [("inspect_refresh_loras", "click"), ("tab_tools", "select"),
                                            ("setting_output_dir", "change")])
def test_tools_list_every_lora_of_the_output_folder_newest_first(app, output_folder, trigger, event):
    folder, newest_first = output_folder
    output_dir, inspect = component(app, "setting_output_dir"), component(app, "inspect_file")
    results = run_handlers(app, component(app, trigger), event, {output_dir: folder})
    assert choices_of(results, inspect) == newest_first
    resize = component(app, "resize_file")
    assert [r[resize] for r in results if isinstance(r, dict) and resize in r] == [newest_first[0]]


def test_an_emptied_or_missing_output_folder_lists_nothing(app, tmp_path):
    output_dir, lora = component(app, "setting_output_dir"), component(app, "tryit_lora")
    for folder in ("", str(tmp_path / "missing")):
        results = run_handlers(app, component(app, "tryit_refresh_loras"), "click", {output_dir: folder})
        assert choices_of(results, lora) == []
