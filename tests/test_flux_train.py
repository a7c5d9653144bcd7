"""FLUX.1 end to end on tiny random models: train 2 steps from a diffusers folder and from kohya_ss's four fp8 files
through ``trainer.loop.train``, resume from the state, sample images, sd-scripts' key set and metadata, and
kohya_ss's own Flux preset through the check."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flux_support import tiny_flux_dir, tiny_flux_files, tiny_flux_fp8_files, tiny_schnell_dir  # noqa: F401
from test_flux_family import sd_scripts_module_names
from test_train import images, tiny_settings  # noqa: F401  (images is a fixture)
from trainer.loop import train
from trainer.preflight import check
from trainer.settings import read_settings_file

pytestmark = pytest.mark.slow
PRESET = Path(__file__).parent / "data" / "kohya_ss_presets" / "flux" / "flux1D - adamw8bit fp8.json"
SAMPLE = "a photo of sks dog --w 64 --h 64 --s 3 --d 7"
# kohya_ss passes its block selections' default, "all" (tests/test_flux_network_args.py)
ALL_BLOCKS = {"train_double_block_indices": "all", "train_single_block_indices": "all"}


def flux_settings(model, images, out, **overrides):
    values = dict(flux1_checkbox=True, LoRA_type="Flux1", max_train_steps=2, t5xxl_max_token_length=16)
    values.update(overrides)
    return tiny_settings(model, images, out, **values)


def lora_keys(path) -> tuple[set[str], dict]:
    with safe_open(str(path), "pt") as f:
        return {k.split(".")[0] for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def folder_run(tiny_flux_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("flux_run") / "out"
    settings = flux_settings(tiny_flux_dir, images, out, save_state=True, sample_prompts=SAMPLE, sample_every_n_steps=2)
    return settings, train(settings)


def test_trains_from_a_diffusers_folder_with_sd_scripts_keys_and_metadata(folder_run):
    settings, result = folder_run
    assert result.status == "finished" and result.step == 2, result.error
    names, meta = lora_keys(Path(settings.output_dir) / "tiny.safetensors")
    assert names == sd_scripts_module_names(double=2, single=2, clip_layers=2)
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_module"] == "networks.lora_flux"


def test_samples_are_made_during_training(folder_run):
    settings, _ = folder_run
    samples = list((Path(settings.output_dir) / "sample").glob("tiny_000002_00_*.png"))
    assert len(samples) == 1 and samples[0].stat().st_size > 0


def test_try_it_applies_the_lora_to_the_flux_folder(folder_run, tiny_flux_dir):
    import numpy as np

    from trainer.inference import GenerateRequest, LoraChoice, TryIt

    settings, _ = folder_run
    request = GenerateRequest(base_model=str(tiny_flux_dir), prompt="a photo of sks dog", width=64, height=64, steps=3,
                              seed=11, cfg_scale=1.0, sampler="euler")
    base, with_lora, base_again = TryIt(device="cpu").compare(request, [
        LoraChoice(None), LoraChoice(str(Path(settings.output_dir) / "tiny.safetensors"), 1.0), LoraChoice(None)])
    pixels = [np.asarray(images[0], dtype=np.float64) for images in (base, with_lora, base_again)]
    assert np.abs(pixels[1] - pixels[0]).mean() > 0 and np.array_equal(pixels[0], pixels[2])


def test_try_it_loads_kohya_ss_four_files_from_the_form(folder_run, tiny_flux_files):
    from app.tab_common import model_flags
    from trainer.inference import GenerateRequest, LoraChoice, TryIt

    settings, _ = folder_run
    files = tiny_flux_files
    form = {"flux1_checkbox": True, "clip_skip": 1, "v_parameterization": False, "clip_l": str(files["clip_l"]),
            "t5xxl": str(files["t5xxl"]), "ae": str(files["ae"])}
    request = GenerateRequest(base_model=str(files["transformer"]), prompt="a photo of sks dog", width=64, height=64,
                              steps=2, seed=3, cfg_scale=1.0, sampler="euler", **model_flags(form))
    assert dict(request.model_files) == {k: str(files[k]) for k in ("clip_l", "t5xxl", "ae")}
    [[image]] = TryIt(device="cpu").compare(request, [LoraChoice(str(Path(settings.output_dir) / "tiny.safetensors"))])
    assert image.size == (64, 64)
    assert model_flags({**form, "flux1_checkbox": False})["model_files"] == ()  # only for FLUX models


def test_inspect_names_the_family_and_verify_matches_every_module(folder_run, tiny_flux_dir):
    from trainer.tools import verify_lora
    from trainer.tools.lora_file import read_lora
    from trainer.tools.lora_info import family_from_keys

    settings, _ = folder_run
    path = Path(settings.output_dir) / "tiny.safetensors"
    assert family_from_keys(read_lora(path)) == "flux1"
    report = verify_lora(path, tiny_flux_dir)
    assert report.ok and "38 of 38 modules match FLUX.1 model" in report.format()


def test_merge_into_the_transformer_file_adds_each_module_delta(folder_run, tiny_flux_files, tmp_path):
    from safetensors.torch import load_file

    from trainer.checkpoints import detect
    from trainer.tools.errors import ToolError
    from trainer.tools.merge import merge_into_checkpoint

    settings, _ = folder_run
    lora = Path(settings.output_dir) / "tiny.safetensors"
    with pytest.raises(ToolError, match="12 of 38 modules match no layer"):  # CLIP-L's: not in a transformer file
        merge_into_checkpoint(tiny_flux_files["transformer"], [lora], tmp_path / "refused.safetensors")
    result = merge_into_checkpoint(tiny_flux_files["transformer"], [(lora, 0.5)], tmp_path / "merged.safetensors",
                                   allow_unmatched=True)
    assert result.loras[0].merged == 26 and detect(tmp_path / "merged.safetensors").family == "flux1"
    base, merged, weights = (load_file(str(p)) for p in (tiny_flux_files["transformer"], tmp_path / "merged.safetensors",
                                                         lora))
    name = "lora_unet_single_blocks_0_linear1"
    down, up, alpha = weights[f"{name}.lora_down.weight"], weights[f"{name}.lora_up.weight"], weights[f"{name}.alpha"]
    expected = base["single_blocks.0.linear1.weight"] + 0.5 * alpha / down.shape[0] * up @ down
    assert torch.allclose(merged["single_blocks.0.linear1.weight"], expected, atol=1e-6)


def test_resumes_from_the_saved_state(folder_run, tmp_path):
    settings, result = folder_run
    [state] = [f for f in result.files if os.path.isdir(f)]
    more = settings.model_copy(update={"resume": state, "max_train_steps": 3, "output_dir": str(tmp_path),
                                       "save_state": False, "sample_prompts": ""})
    resumed = train(more)
    assert resumed.status == "finished" and resumed.step == 3, resumed.error


def test_trains_from_kohya_ss_four_fp8_files_single_blocks_only(tiny_flux_fp8_files, images, tmp_path):
    """The separate-files layout (fp8 files, upcast) trains, samples and resumes too."""
    files = tiny_flux_fp8_files
    settings = flux_settings(files["transformer"], images, tmp_path / "out", clip_l=str(files["clip_l"]),
                             t5xxl=str(files["t5xxl"]), ae=str(files["ae"]), split_mode=True, text_encoder_lr=0,
                             apply_t5_attn_mask=True, timestep_sampling="flux_shift", model_prediction_type="raw",
                             save_state=True, sample_prompts=SAMPLE, sample_every_n_steps=2)
    report = check(settings, deep=False)
    assert not report.errors, [p.message for p in report.errors]
    result = train(settings)
    assert result.status == "finished", result.error
    names, meta = lora_keys(tmp_path / "out" / "tiny.safetensors")
    assert names == sd_scripts_module_names(double=2, single=2, single_only=True)
    assert json.loads(meta["ss_network_args"]) == {**ALL_BLOCKS, "train_blocks": "single"}
    assert len(list((tmp_path / "out" / "sample").glob("tiny_000002_00_*.png"))) == 1
    [state] = [f for f in result.files if os.path.isdir(f)]
    resumed = train(settings.model_copy(update={"resume": state, "max_train_steps": 3, "save_state": False,
                                                "sample_prompts": "", "output_dir": str(tmp_path / "more")}))
    assert resumed.status == "finished" and resumed.step == 3, resumed.error


def test_trains_t5xxl_with_gradient_checkpointing_under_sd_scripts_te3_names(tiny_flux_dir, images, tmp_path):
    settings = flux_settings(tiny_flux_dir, images, tmp_path, train_t5xxl=True, gradient_checkpointing=True,
                             apply_t5_attn_mask=True, t5xxl_lr=5e-4)
    steps = []
    result = train(settings, lambda event: steps.append(event) if type(event).__name__ == "Step" else None)
    assert result.status == "finished", result.error
    assert steps[-1].lrs == {"unet": 1e-2, "textencoder lora_te3": 5e-4, "textencoder": 1e-3}  # t5xxl_lr for T5
    names, meta = lora_keys(tmp_path / "tiny.safetensors")
    t5 = {f"lora_te3_encoder_block_{i}_layer_0_SelfAttention_{m}" for i in range(2) for m in "qkvo"}
    t5 |= {f"lora_te3_encoder_block_{i}_layer_1_DenseReluDense_{m}" for i in range(2) for m in ("wi_0", "wi_1", "wo")}
    assert names == sd_scripts_module_names(double=2, single=2, clip_layers=2) | t5
    assert json.loads(meta["ss_network_args"]) == {**ALL_BLOCKS, "train_t5xxl": "True"}


def test_a_lycoris_type_trains_flux_under_the_same_module_names(tiny_flux_dir, images, tmp_path):
    """kohya_ss lets LyCORIS types train FLUX.1: LyCORIS knows the BFL blocks (DoubleStreamBlock, SingleStreamBlock)."""
    settings = flux_settings(tiny_flux_dir, images, tmp_path, LoRA_type="LyCORIS/LoHa", conv_dim=4, conv_alpha=1)
    result = train(settings)
    assert result.status == "finished", result.error
    names, meta = lora_keys(tmp_path / "tiny.safetensors")
    assert names == sd_scripts_module_names(double=2, single=2, clip_layers=2)
    assert meta["ss_network_module"] == "lycoris.kohya"


def test_schnell_trains_samples_and_says_schnell(tiny_schnell_dir, images, tmp_path):
    settings = flux_settings(tiny_schnell_dir, images, tmp_path, sample_prompts=SAMPLE, sample_every_n_steps=2,
                             timestep_sampling="sigmoid")
    result = train(settings)
    assert result.status == "finished", result.error
    assert lora_keys(tmp_path / "tiny.safetensors")[1]["modelspec.architecture"] == "flux-1-schnell/lora"
    assert len(list((tmp_path / "sample").glob("*.png"))) == 1


def test_kohya_ss_flux_preset_loads_and_passes_the_check(tiny_flux_files, images, tmp_path):
    report = read_settings_file(PRESET)
    files = tiny_flux_files
    # only what ties the preset to its author's machine changes: the four model files, folders and image size
    settings = report.settings.model_copy(update={
        "pretrained_model_name_or_path": str(files["transformer"]), "clip_l": str(files["clip_l"]),
        "t5xxl": str(files["t5xxl"]), "ae": str(files["ae"]), "train_data_dir": str(images),
        "output_dir": str(tmp_path / "out"), "logging_dir": "", "max_resolution": "64,64",
        "min_bucket_reso": 64, "max_bucket_reso": 128,
    })
    assert settings.flux1_checkbox and settings.LoRA_type == "Flux1"
    result = check(settings, deep=False)
    assert not result.errors, [(p.field, p.message) for p in result.errors]
    # sd-scripts' FLUX trainer ignores both: off for the run, with a note each
    notes = {p.field: p for p in result.by_severity("note")}
    assert "is not used for FLUX.1" in notes["min_snr_gamma"].message and "noise_offset" in notes
    adjusted = result.adjusted(settings)
    assert adjusted.min_snr_gamma == 0 and adjusted.noise_offset == 0 and settings.min_snr_gamma == 7
