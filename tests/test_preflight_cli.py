"""`python -m trainer check --config FILE` as a user runs it: exit codes and messages naming the field or file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_preflight_support import valid_config, write_hostile_pickle, write_huge_png
from trainer.devtools.synthetic import add_corrupt_image, make_image_folder

pytestmark = pytest.mark.slow  # every check runs `python -m trainer check` in a subprocess

ROOT = Path(__file__).resolve().parent.parent


def run_check(tmp_path, config: dict, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainer", "check", "--config", str(path), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def config(tmp_path, tiny_sd1_file):
    return valid_config(tmp_path, tiny_sd1_file)


def test_valid_config_exits_0_quickly_without_torch(tmp_path, config):
    start = time.perf_counter()
    out = run_check(tmp_path, config)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("Preflight: 0 errors") == 1 and "Step plan:" in out.stdout and "Memory estimate:" in out.stdout
    assert elapsed < 20  # typically under 1 s; generous for a loaded 2-core machine
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from trainer.cli import main; rc = main(sys.argv[1:]); "
         "print('torch imported' if 'torch' in sys.modules else 'no torch')", "check", "--config", str(tmp_path / "config.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert probe.stdout.strip().endswith("no torch"), probe.stdout + probe.stderr


def test_missing_image_folder(tmp_path, config):
    missing = tmp_path / "no_such_folder"
    out = run_check(tmp_path, {**config, "train_data_dir": str(missing)})
    assert out.returncode == 1
    assert f"error    train_data_dir (Image folder): {missing} does not exist" in out.stdout


def test_leaf_folder_instead_of_parent(tmp_path, config):
    make_image_folder(tmp_path / "data", {"20_ohwx": 3})
    out = run_check(tmp_path, {**config, "train_data_dir": str(tmp_path / "data" / "20_ohwx")})
    assert out.returncode == 1
    assert "train_data_dir (Image folder):" in out.stdout and "3 images directly" in out.stdout
    assert f"set it to the parent folder {tmp_path / 'data'}" in out.stdout


def test_bad_image_is_named(tmp_path, config):
    bad = add_corrupt_image(Path(config["train_data_dir"]) / "5_cat", "scan_0042.png")
    out = run_check(tmp_path, config)
    assert out.returncode == 1 and "scan_0042.png" in out.stdout and str(bad) in out.stdout
    assert run_check(tmp_path, {**config, "bad_image_policy": "skip"}).returncode == 0


def test_model_of_the_wrong_family(tmp_path, config, tiny_sd2_file):
    out = run_check(tmp_path, {**config, "pretrained_model_name_or_path": str(tiny_sd2_file), "v2": False})
    assert out.returncode == 1
    assert "error    v2 (v2): the model is Stable Diffusion 2.x" in out.stdout and "fix: tick v2" in out.stdout
    assert run_check(tmp_path, {**config, "pretrained_model_name_or_path": str(tiny_sd2_file), "v2": True}).returncode == 0


def test_adafactor_with_warmup_is_adjusted_with_a_note(tmp_path, config):
    out = run_check(tmp_path, {**config, "optimizer": "Adafactor", "lr_scheduler": "cosine", "lr_warmup": 10})
    assert out.returncode == 0, out.stdout
    assert "note     lr_warmup (LR warmup (% of total steps)): Adafactor with relative_step=True" in out.stdout
    assert "adjusted for this run: lr_warmup = 0" in out.stdout
    assert "adjusted for this run: lr_scheduler = 'adafactor'" in out.stdout


def test_output_that_would_be_overwritten(tmp_path, config):
    out_dir = Path(config["output_dir"])
    out_dir.mkdir()
    (out_dir / "my_lora.safetensors").write_bytes(b"last night's LoRA")
    out = run_check(tmp_path, config)
    assert out.returncode == 0
    assert "warning  output_name (Model output name): 1 file(s) from an earlier run would be overwritten: my_lora.safetensors" in out.stdout


def test_output_name_with_a_slash(tmp_path, config):
    out = run_check(tmp_path, {**config, "output_name": "loras/my_lora"})
    assert out.returncode == 1
    assert "output_name" in out.stdout + out.stderr and "'/'" in out.stdout + out.stderr


def test_hostile_pickle_is_refused_and_creates_nothing(tmp_path, config):
    marker = tmp_path / "pwned.txt"
    evil = write_hostile_pickle(tmp_path / "model.ckpt", marker)
    out = run_check(tmp_path, {**config, "pretrained_model_name_or_path": str(evil)})
    assert out.returncode == 1
    assert "error    pretrained_model_name_or_path" in out.stdout and "refuses to run" in out.stdout
    assert ".safetensors" in out.stdout
    assert not marker.exists()


def test_overrides_reach_the_check(tmp_path, config):
    out = run_check(tmp_path, config, "--set", "learning_rate=0", "--set", "unet_lr=0", "--set", "text_encoder_lr=0")
    assert out.returncode == 1 and "learning_rate (Learning rate): every learning rate is 0" in out.stdout


def test_caption_extension_that_is_a_path_is_refused_naming_the_field(tmp_path, config):
    out = run_check(tmp_path, {**config, "caption_extension": "../../x"})
    assert out.returncode == 1
    assert "caption_extension (Caption file extension" in out.stderr and "not a file extension" in out.stderr
    assert "please report" not in out.stdout + out.stderr
    assert run_check(tmp_path, {**config, "caption_extension": "txt"}).returncode == 0


def test_huge_image_is_named_with_its_size_and_follows_the_bad_image_policy(tmp_path, config):
    huge = write_huge_png(Path(config["train_data_dir"]) / "5_cat" / "panorama.png")
    out = run_check(tmp_path, config)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"error    train_data_dir (Image folder): panorama.png: 30000×30000 pixels (900 MP); images over 179 MP " \
           "are not read" in out.stdout and str(huge) in out.stdout
    assert "please report" not in out.stdout and "Decompression" not in out.stdout + out.stderr
    skipping = run_check(tmp_path, {**config, "bad_image_policy": "skip"})
    assert skipping.returncode == 0 and "panorama.png: 30000×30000 pixels" in skipping.stdout


def _cut(source: Path, target: Path, keep: float = 0.6) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def _lora(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.ones(8, 64), "lora_unet_x.lora_up.weight": torch.ones(64, 8)},
              str(path))
    return path


def _damaged(case: str, tmp_path: Path, model_file: Path, model_dir: Path) -> tuple[dict, str, Path]:
    """(settings, field, the file to be named) of one damaged input."""
    import shutil

    if case == "truncated base model":
        cut = _cut(model_file, tmp_path / "cut_model.safetensors")
        return {"pretrained_model_name_or_path": str(cut)}, "pretrained_model_name_or_path", cut
    if case == "pickle in a diffusers folder":
        folder = Path(shutil.copytree(model_dir, tmp_path / "pickled_model"))
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        bad = write_hostile_pickle(folder / "unet" / "diffusion_pytorch_model.bin", tmp_path / "pwned")
        return {"pretrained_model_name_or_path": str(folder)}, "pretrained_model_name_or_path", bad
    if case == "truncated network_weights":
        cut = _cut(_lora(tmp_path / "whole.safetensors"), tmp_path / "cut_lora.safetensors", 0.9)
        return {"network_weights": str(cut), "network_dim": 8}, "network_weights", cut
    state = tmp_path / "my_lora-state"
    state.mkdir()
    (state / "train_state.json").write_text('{"current_step": 1, "current_epoch": 1}')
    _lora(state / "lora.safetensors")
    bad = write_hostile_pickle(state / "optimizer.pt", tmp_path / "pwned")
    return {"resume": str(state)}, "resume", bad


@pytest.mark.parametrize("case", ["truncated base model", "pickle in a diffusers folder", "truncated network_weights",
                                  "pickle in the resume state"])
def test_damaged_or_pickled_weights_are_named_by_the_check(case, tmp_path, config, tiny_sd1_file, tiny_sd1_dir):
    overrides, field, bad = _damaged(case, tmp_path, tiny_sd1_file, tiny_sd1_dir)
    out = run_check(tmp_path, {**config, **overrides})
    assert out.returncode == 1, out.stdout + out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith(f"error    {field} "))
    assert f": {bad.name} " in line and ("is truncated" in line or "cannot be loaded safely" in line), line
    assert f"file: {bad}" in out.stdout
    assert "weights_only=False" not in out.stdout and "weights_only` set to `False" not in out.stdout
    assert not (tmp_path / "pwned").exists()
