"""A model family added from outside Nekoya's package: a spec and an adapter defined in this file only.

The toy family is an SD1 clone under another key. Registered, it takes over SD1 checkpoints
and kohya's SD1 checkboxes: the check, the GUI's model pick, training, the saved metadata and
the tools name it; unregistered, everything says SD 1.x again.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from safetensors import safe_open

from app.model_pick import on_model_path
from test_train import tiny_settings
from trainer.families import (SPECS, create_family, family_spec, register_spec, spec_for_checkpoint, spec_for_flags,
                              spec_for_settings, unregister_spec)
from trainer.families.sd import SD1Family
from trainer.families.stable_diffusion import SD1, SD2
from trainer.loop import train
from trainer.preflight import check
from trainer.settings import TrainingSettings
from trainer.tools import verify_lora

# its tiny test model: SD1's, narrower, so a folder built from it can only have come from this spec
TOY_TINY = replace(SD1.tiny, unet={**SD1.tiny.unet, "block_out_channels": [32, 32]})
TOY = replace(SD1, key="toy1", label="Toy Diffusion 1", short_label="Toy 1", adapter=f"{__name__}:ToyFamily",
              checkpoint_layout="sd1", tiny=TOY_TINY)


class ToyFamily(SD1Family):
    spec = TOY

    def version_metadata(self):
        return replace(super().version_metadata(), base_model_version="toy_v1", architecture="toy-diffusion-v1")


@pytest.fixture
def toy():
    register_spec(TOY)
    yield TOY
    unregister_spec(TOY.key)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from trainer.devtools.synthetic import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("toy_images") / "img", {"1_toy": 2}, sizes=[(64, 64)], seed=3)


def test_registering_and_unregistering_changes_every_lookup(toy):
    sd1_flags = {"v2": False, "sdxl": False}
    assert spec_for_flags(sd1_flags) is toy and spec_for_checkpoint("sd1") is toy and family_spec("toy1") is toy
    assert spec_for_flags({"v2": True, "sdxl": False}).key == "sd2"  # the others are untouched
    unregister_spec(toy.key)
    assert "toy1" not in SPECS and spec_for_flags(sd1_flags) is SD1 and spec_for_checkpoint("sd1") is SD1
    with pytest.raises(ValueError, match="unknown model family 'toy1'"):
        family_spec("toy1")
    register_spec(toy)


def test_adapter_class_is_loaded_from_the_spec(toy):
    family = create_family(TrainingSettings())
    assert type(family) is ToyFamily and family.key == "toy1"
    assert family.noise_schedule("cpu").num_steps == toy.schedule.num_train_timesteps


def test_check_names_the_toy_family(toy, tiny_sd1_dir, images, tmp_path):
    good = check(tiny_settings(tiny_sd1_dir, images, tmp_path / "out"), deep=False)
    assert not [p for p in good.errors if p.field in ("v2", "sdxl")]
    assert good.memory is not None and good.memory.total_bytes > 0
    wrong = check(tiny_settings(tiny_sd1_dir, images, tmp_path / "out", v2=True), deep=False)
    messages = [p.message for p in wrong.errors if p.field == "v2"]
    assert messages and "the model is Toy Diffusion 1 (from its weights)" in messages[0]


def test_model_pick_detects_the_toy_family(toy, tiny_sd1_dir):
    values, note = on_model_path(str(tiny_sd1_dir))
    assert note == "Detected Toy 1 from the model."
    assert (values["v2"], values["sdxl"], values["v_parameterization"]) == (False, False, False)
    assert spec_for_settings(TrainingSettings(**{k: values[k] for k in ("v2", "sdxl")})) is toy


@pytest.mark.slow  # trains a tiny model
def test_training_metadata_and_tools_use_the_toy_family(toy, tiny_sd1_dir, images, tmp_path):
    result = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "out"))
    assert result.status == "finished", result.error
    saved = tmp_path / "out" / "tiny.safetensors"
    with safe_open(str(saved), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == "toy_v1"
    assert metadata["modelspec.architecture"].startswith("toy-diffusion-v1")
    report = verify_lora(saved, tiny_sd1_dir)
    assert report.ok and "match Toy 1 model" in report.format()
    unregister_spec(toy.key)
    assert "match SD 1.x model" in verify_lora(saved, tiny_sd1_dir).format()
    register_spec(toy)


def test_devtools_build_the_toy_tiny_model_from_its_spec(toy, tmp_path):
    from trainer.checkpoints import detect
    from trainer.devtools.synthetic import build_tiny_pipeline

    folder = build_tiny_pipeline(tmp_path / "toy", family="toy1")
    assert json.loads((folder / "unet" / "config.json").read_text())["block_out_channels"] == [32, 32]
    assert spec_for_checkpoint(detect(folder).family) is toy
    unregister_spec(toy.key)
    with pytest.raises(ValueError, match="unknown family 'toy1'"):
        build_tiny_pipeline(tmp_path / "gone", family="toy1")
    register_spec(toy)


def test_detection_asks_the_family_whether_its_files_tell_the_prediction(tiny_sd2_file):
    from trainer.checkpoints import detect

    assert detect(tiny_sd2_file).v_parameterization is None  # SD2's files do not say
    telling = register_spec(replace(SD2, key="toy2", checkpoint_layout="sd2", files_tell_prediction=True))
    try:
        assert detect(tiny_sd2_file).v_parameterization is False
    finally:
        unregister_spec(telling.key)


def test_family_records_load_without_torch():
    code = ("import sys, trainer.families, trainer.preflight.families, app.model_pick; "
            "print(sorted(trainer.families.SPECS), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['flux1', 'sd1', 'sd2', 'sd3', 'sdxl'] False"


def test_picking_any_family_sets_every_family_checkbox():
    """A family's flags name every model checkbox, so picking it unticks the others' (a FLUX pick unticks SD3)."""
    from trainer.families.registry import FLAG_KEYS, SPECS

    for spec in SPECS.values():
        assert set(FLAG_KEYS) - {"v_parameterization"} <= set(spec.flags), spec.key
