"""Every LoRA preset kohya_ss ships for SD 1.x/2.x/SDXL loads as is and trains 2 steps on a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from test_train import images  # noqa: F401  (a fixture)
from trainer.loop import train
from trainer.settings import read_settings_file

PRESETS = sorted((Path(__file__).parent / "data" / "kohya_ss_presets").glob("*.json"))


def test_the_presets_are_all_here():
    assert len(PRESETS) == 30


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_kohya_preset_loads_and_trains_two_steps(preset, tiny_sd1_dir, tiny_sdxl_dir, images, tmp_path):  # noqa: F811
    report = read_settings_file(preset)
    original = json.loads(preset.read_text())
    sdxl = bool(original.get("sdxl"))
    # only what ties a preset to its author's machine changes: model, folders, samples, steps and image size
    settings = report.settings.model_copy(update={
        "pretrained_model_name_or_path": str(tiny_sdxl_dir if sdxl else tiny_sd1_dir),
        "train_data_dir": str(images), "reg_data_dir": "",
        "output_dir": str(tmp_path / "out"), "logging_dir": "", "sample_prompts": "", "sample_every_n_steps": 0,
        "sample_every_n_epochs": 0, "resume": "", "network_weights": "", "max_train_steps": 2,
        "max_resolution": "64,64", "min_bucket_reso": 64, "max_bucket_reso": 128, "v2": False,
        "v_parameterization": False,
    })
    if settings.dim_from_weights:  # a phase-2 preset: it continues from the LoRA its phase 1 made
        first = train(settings.model_copy(update={"dim_from_weights": False, "output_dir": str(tmp_path / "first")}))
        assert first.status == "finished", first.error
        settings = settings.model_copy(update={"network_weights": first.files[-1]})
    result = train(settings)
    assert result.status == "finished", f"{preset.name}: {result.error}"
    with safe_open(result.files[-1], "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == str(settings.network_dim)
    assert meta["ss_network_module"] == ("lycoris.kohya" if settings.LoRA_type.startswith("LyCORIS") else
                                         "networks.lora")
