"""Preflight model checks: path, readability, family against v2/v_parameterization/SDXL, unsafe pickles."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from test_preflight_support import big_cpu, problems, settings, write_hostile_pickle
from trainer.checkpoints.integrity import read_safetensors_header
from trainer.preflight import check
from trainer.preflight import device as device_module

KEY = "pretrained_model_name_or_path"


@pytest.fixture(autouse=True)
def fixed_device(monkeypatch):
    monkeypatch.setattr(device_module, "probe_device", big_cpu)


def model_errors(report, key=KEY):
    return problems(report, "error", key)


def test_each_tiny_family_passes_with_the_right_flags(tmp_path, tiny_sd1_file, tiny_sd2_file, tiny_sdxl_file, tiny_sd2v_dir):
    cases = [(tiny_sd1_file, {}), (tiny_sd2_file, {"v2": True}), (tiny_sdxl_file, {"sdxl": True}),
             (tiny_sd2v_dir, {"v2": True, "v_parameterization": True})]
    for path, flags in cases:
        report = check(settings(tmp_path, path, **flags))
        assert report.ok, report.format()


def test_missing_empty_and_hub_names(tmp_path, tiny_sd1_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    [error] = model_errors(check(settings(tmp_path, "")))
    assert "no base model" in error.message
    [error] = model_errors(check(settings(tmp_path, tmp_path / "nope.safetensors")))
    assert "does not exist" in error.message
    [error] = model_errors(check(settings(tmp_path, "someone/some-model")))
    assert "never downloads" in error.message


def test_hub_name_found_in_the_local_cache(tmp_path, tiny_sd1_dir, monkeypatch):
    import shutil

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_sd1_dir, snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert check(settings(tmp_path, "someone/tiny")).ok


def test_wrong_family_names_the_flag_to_change(tmp_path, tiny_sd2_file, tiny_sdxl_file, tiny_sd1_file):
    [error] = problems(check(settings(tmp_path, tiny_sd2_file)), "error", "v2")
    assert "Stable Diffusion 2.x" in error.message and "tick v2" in error.fix and error.file == str(tiny_sd2_file)
    errors = check(settings(tmp_path, tiny_sdxl_file, v2=True)).errors
    assert {p.field for p in errors} == {"v2", "sdxl"}
    assert all("tick sdxl" in p.fix and "untick v2" in p.fix for p in errors)
    [error] = problems(check(settings(tmp_path, tiny_sd1_file, sdxl=True)), "error", "sdxl")
    assert "untick sdxl" in error.fix


def test_v_parameterization_from_a_diffusers_scheduler(tmp_path, tiny_sd2v_dir, tiny_sd2_dir):
    [error] = problems(check(settings(tmp_path, tiny_sd2v_dir, v2=True)), "error", "v_parameterization")
    assert "v-prediction" in error.message and error.fix.startswith("tick")
    [error] = problems(check(settings(tmp_path, tiny_sd2_dir, v2=True, v_parameterization=True)), "error", "v_parameterization")
    assert error.fix.startswith("untick")


def test_sd2_single_file_notes_that_v_prediction_is_unknown(tmp_path, tiny_sd2_file):
    [note] = problems(check(settings(tmp_path, tiny_sd2_file, v2=True)), "note", "v_parameterization")
    assert "does not say" in note.message


def test_files_that_are_not_base_models(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": np.zeros((4, 8), np.float32)}, lora)
    [error] = model_errors(check(settings(tmp_path, lora)))
    assert "LoRA" in error.message and error.file == str(lora)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    [error] = model_errors(check(settings(tmp_path, junk)))
    assert "not a readable" in error.message
    folder = tmp_path / "not_diffusers"
    folder.mkdir()
    [error] = model_errors(check(settings(tmp_path, folder)))
    assert "model_index.json" in error.message


def test_safetensors_header_is_read_without_torch(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": np.zeros((2, 3), np.float16)}, path, metadata={"k": "v"})
    header = read_safetensors_header(path)
    assert (header.shapes, dict(header.metadata), header.data_end) == ({"a": (2, 3)}, {"k": "v"}, 2 * 3 * 2)
    assert header.header_bytes + header.data_end == path.stat().st_size
    assert read_safetensors_header(path) is header  # read once while the file is unchanged
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError):
        read_safetensors_header(truncated)


def test_a_safe_ckpt_is_read_and_noted(tmp_path, tiny_sd1_dir):
    from trainer.devtools.single_file import save_single_file

    ckpt = save_single_file(tiny_sd1_dir, tmp_path / "model.ckpt")
    report = check(settings(tmp_path, ckpt))
    assert report.ok, report.format()
    assert any("safe loader" in p.message for p in problems(report, "note", KEY))


@pytest.mark.parametrize("zipped", [False, True])
def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, zipped):
    marker = tmp_path / "created_by_pickle"
    path = tmp_path / "evil.ckpt"
    if zipped:
        import torch

        class Hostile:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        torch.save({"state_dict": {"x": Hostile()}}, path)
    else:
        write_hostile_pickle(path, marker)
    assert not marker.exists()
    for target in ("pretrained_model_name_or_path", "vae", "network_weights"):
        s = settings(tmp_path, path) if target == KEY else settings(tmp_path, "", **{target: str(path)})
        [error] = problems(check(s), "error", target)
        assert "safetensors" in (error.message + error.fix)
    assert not marker.exists()


def test_vae_setting(tmp_path, tiny_sd1_file, tiny_sd1_dir):
    [error] = problems(check(settings(tmp_path, tiny_sd1_file, vae=str(tmp_path / "no_vae.pt"))), "error", "vae")
    assert "does not exist" in error.message
    assert check(settings(tmp_path, tiny_sd1_file, vae=str(tiny_sd1_dir / "vae"))).ok
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": np.zeros((4, 8), np.float32)}, lora)
    [error] = problems(check(settings(tmp_path, tiny_sd1_file, vae=str(lora))), "error", "vae")
    assert "not a VAE" in error.message


def test_model_detection_is_cached_by_path_mtime_and_size(tmp_path, tiny_sd1_file, monkeypatch):
    import sys

    import trainer.checkpoints.detect  # noqa: F401

    detect_module = sys.modules["trainer.checkpoints.detect"]
    calls = []
    real = detect_module.detect_from_keys
    monkeypatch.setattr(detect_module, "detect_from_keys", lambda *a, **k: calls.append(1) or real(*a, **k))
    import shutil

    copy = shutil.copy(tiny_sd1_file, tmp_path / "copy.safetensors")  # a path no other test has cached
    s = settings(tmp_path, copy)
    check(s)
    check(s)
    assert len(calls) == 1
    with open(copy, "ab") as f:  # changed file: read again
        f.write(b" ")
    check(s)
    assert len(calls) == 2


def test_diffusers_folder_config_is_read(tmp_path, tiny_sdxl_dir):
    index = json.loads((tiny_sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    [error] = problems(check(settings(tmp_path, tiny_sdxl_dir)), "error", "sdxl")
    assert "Stable Diffusion XL" in error.message
