"""SD 3 / 3.5 end to end on tiny random models: train 2 steps from a diffusers folder, a SAI file with its encoders
and a SAI file with separate fp8 encoder files through ``trainer.loop.train``, resume from the state, sample images,
sd-scripts' key set and metadata, ComfyUI's key mapping, and a merge that changes diffusers' SD3 transformer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd3_support import tiny_sd3_dir, tiny_sd3_files, tiny_sd3_fp8_files, tiny_sd35_dir  # noqa: F401
from test_train import images, tiny_settings  # noqa: F401  (images is a fixture)
from trainer.loop import train
from trainer.preflight import check

pytestmark = pytest.mark.slow
SAMPLE = "a photo of sks dog --w 64 --h 64 --s 3 --d 7 --l 4"
STREAM_LINEARS = ("adaLN_modulation_1", "attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2")
CLIP_LINEARS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def sd_scripts_module_names(depth: int, clip_layers: int = 0, self_attn: tuple[int, ...] = ()) -> set[str]:
    """What networks.lora_sd3's target rules give, written from SAI's MMDiT (not from Nekoya's modules): every Linear
    of each joint block's x_block and context_block (SingleDiTBlock), the last context block pre-only (its adaLN and
    qkv), MMDiT-X blocks' attn2; CLIP-L's and CLIP-G's attention and MLP Linears under lora_te1 / lora_te2."""
    names = set()
    for i in range(depth):
        x = [*STREAM_LINEARS, *(("attn2_qkv", "attn2_proj") if i in self_attn else ())]
        context = STREAM_LINEARS[:2] if i == depth - 1 else STREAM_LINEARS
        names |= {f"lora_unet_joint_blocks_{i}_x_block_{m}" for m in x}
        names |= {f"lora_unet_joint_blocks_{i}_context_block_{m}" for m in context}
    for prefix in ("lora_te1", "lora_te2"):
        names |= {f"{prefix}_text_model_encoder_layers_{i}_{m}" for i in range(clip_layers) for m in CLIP_LINEARS}
    return names


def sd3_settings(model, images, out, **overrides):
    values = dict(sd3_checkbox=True, LoRA_type="Standard", max_train_steps=2)
    values.update(overrides)
    return tiny_settings(model, images, out, **values)


def lora_keys(path) -> tuple[set[str], dict]:
    with safe_open(str(path), "pt") as f:
        return {k.split(".")[0] for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def folder_run(tiny_sd3_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3_run") / "out"
    settings = sd3_settings(tiny_sd3_dir, images, out, save_state=True, sample_prompts=SAMPLE, sample_every_n_steps=2)
    return settings, train(settings)


def test_trains_from_a_diffusers_folder_with_sd_scripts_keys_and_metadata(folder_run):
    settings, result = folder_run
    assert result.status == "finished" and result.step == 2, result.error
    names, meta = lora_keys(Path(settings.output_dir) / "tiny.safetensors")
    assert names == sd_scripts_module_names(depth=2, clip_layers=2)
    assert meta["ss_base_model_version"] == "sd3" and meta["ss_network_module"] == "networks.lora_sd3"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora"


def test_samples_are_made_during_training(folder_run):
    settings, _ = folder_run
    samples = list((Path(settings.output_dir) / "sample").glob("tiny_000002_00_*.png"))
    assert len(samples) == 1 and samples[0].stat().st_size > 0


def test_resumes_from_the_saved_state(folder_run, tmp_path):
    settings, result = folder_run
    [state] = [f for f in result.files if os.path.isdir(f)]
    more = settings.model_copy(update={"resume": state, "max_train_steps": 3, "output_dir": str(tmp_path),
                                       "save_state": False, "sample_prompts": ""})
    resumed = train(more)
    assert resumed.status == "finished" and resumed.step == 3, resumed.error


def test_keys_map_onto_the_sai_model_as_comfyui_maps_them(folder_run, tiny_sd3_files):
    """ComfyUI's comfy/lora.py: model_lora_keys_unet maps ``lora_unet_`` + a ``diffusion_model.`` weight's key (dots
    as underscores) onto that weight; model_lora_keys_clip maps ``lora_te1_``/``lora_te2_`` + the key under
    ``clip_l.transformer.`` / ``clip_g.transformer.`` the same way. A SAI file stores them under model. and
    text_encoders., which ComfyUI strips when it loads the checkpoint."""
    from trainer.checkpoints.integrity import read_safetensors_header

    settings, _ = folder_run
    names, _ = lora_keys(Path(settings.output_dir) / "tiny.safetensors")
    shapes = read_safetensors_header(tiny_sd3_files["full"]).shapes
    key_map = {}
    for key in shapes:
        if not key.endswith(".weight"):
            continue
        stem = key[: -len(".weight")]
        if stem.startswith("model.diffusion_model."):
            key_map["lora_unet_" + stem[len("model.diffusion_model."):].replace(".", "_")] = key
        for prefix, encoder in (("lora_te1_", "clip_l"), ("lora_te2_", "clip_g")):
            if stem.startswith(f"text_encoders.{encoder}.transformer.text_model."):
                key_map[prefix + stem[len(f"text_encoders.{encoder}.transformer."):].replace(".", "_")] = key
    assert names <= set(key_map), sorted(names - set(key_map))[:5]
    with safe_open(str(Path(settings.output_dir) / "tiny.safetensors"), "pt") as lora:
        for name in names:  # up @ down has the mapped weight's shape
            up, down = lora.get_tensor(f"{name}.lora_up.weight"), lora.get_tensor(f"{name}.lora_down.weight")
            assert tuple((up @ down).shape) == tuple(shapes[key_map[name]]), name


def test_merge_into_the_sai_file_changes_diffusers_sd3_transformer(folder_run, tiny_sd3_files, tmp_path):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    from trainer.checkpoints import detect
    from trainer.devtools.tiny_sd3 import TINY_MMDIT
    from trainer.families.sd3_weights import SAI_PREFIX
    from trainer.tools.merge import merge_into_checkpoint

    settings, _ = folder_run
    lora = Path(settings.output_dir) / "tiny.safetensors"
    merged_path = tmp_path / "merged.safetensors"
    names = lora_keys(lora)[0]
    result = merge_into_checkpoint(tiny_sd3_files["full"], [(lora, 1.0)], merged_path, allow_unmatched=True)
    unet_modules = {n for n in names if n.startswith("lora_unet_")}
    assert result.loras[0].merged == len(unet_modules) and detect(merged_path).family == "sd3"
    assert set(result.loras[0].unmatched) == names - unet_modules  # CLIP-L's and CLIP-G's: not in an MMDiT file
    base = {k[len(SAI_PREFIX):]: v for k, v in load_file(str(tiny_sd3_files["full"])).items() if k.startswith(SAI_PREFIX)}
    merged, weights = load_file(str(merged_path)), load_file(str(lora))
    name, key = "lora_unet_joint_blocks_0_x_block_attn_qkv", "joint_blocks.0.x_block.attn.qkv.weight"
    down, up, alpha = weights[f"{name}.lora_down.weight"], weights[f"{name}.lora_up.weight"], weights[f"{name}.alpha"]
    assert torch.allclose(merged[key], base[key] + alpha / down.shape[0] * up @ down, atol=1e-6)

    def diffusers_output(state):
        model = SD3Transformer2DModel(**TINY_MMDIT).eval()
        model.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(state)), strict=True)
        generator = torch.Generator().manual_seed(0)
        x, context = torch.randn(1, 16, 8, 8, generator=generator), torch.randn(1, 9, 64, generator=generator)
        with torch.no_grad():
            return model(x, context, torch.randn(1, 64, generator=generator), torch.tensor([500.0])).sample

    assert (diffusers_output(merged) - diffusers_output(base)).abs().max() > 1e-4


def test_trains_from_a_sai_file_with_its_encoders(tiny_sd3_files, images, tmp_path):
    settings = sd3_settings(tiny_sd3_files["full"], images, tmp_path, weighting_scheme="mode",
                            gradient_checkpointing=True)
    report = check(settings, deep=False)
    assert not report.errors, [p.message for p in report.errors]
    result = train(settings)
    assert result.status == "finished", result.error
    assert lora_keys(tmp_path / "tiny.safetensors")[0] == sd_scripts_module_names(depth=2, clip_layers=2)


def test_trains_from_a_sai_file_and_separate_fp8_encoders_unet_only(tiny_sd3_fp8_files, images, tmp_path):
    files = tiny_sd3_fp8_files
    settings = sd3_settings(files["bare"], images, tmp_path, sd3_clip_l=str(files["clip_l"]),
                            clip_g=str(files["clip_g"]), sd3_t5xxl=str(files["t5xxl"]),
                            sd3_cache_text_encoder_outputs=True, text_encoder_lr=0)
    report = check(settings, deep=False)
    assert not report.errors, [p.message for p in report.errors]
    result = train(settings)
    assert result.status == "finished", result.error
    assert lora_keys(tmp_path / "tiny.safetensors")[0] == sd_scripts_module_names(depth=2)


def test_sd35_trains_mmdit_x_attention_and_says_3_5(tiny_sd35_dir, images, tmp_path):
    settings = sd3_settings(tiny_sd35_dir, images, tmp_path, text_encoder_lr=0, network_train_unet_only=True)
    result = train(settings)
    assert result.status == "finished", result.error
    names, meta = lora_keys(tmp_path / "tiny.safetensors")
    assert names == sd_scripts_module_names(depth=2, self_attn=(0,))
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"


def test_the_check_accepts_sd3_and_estimates_its_memory(tiny_sd3_dir, images, tmp_path):
    settings = sd3_settings(tiny_sd3_dir, images, tmp_path)
    report = check(settings, deep=False)
    assert not report.errors, [p.message for p in report.errors]
    text = " ".join(p.message for p in report.problems)
    assert "GiB" in text or report.memory is not None
    refused = check(sd3_settings(tiny_sd3_dir, images, tmp_path, LoRA_type="LyCORIS/LoHa"), deep=False)
    assert any(p.field == "LoRA_type" and "SD3" in p.message for p in refused.errors)


def test_try_it_applies_the_lora_to_the_sd3_folder(folder_run, tiny_sd3_dir):
    import numpy as np

    from trainer.inference import GenerateRequest, LoraChoice, TryIt

    settings, _ = folder_run
    request = GenerateRequest(base_model=str(tiny_sd3_dir), prompt="a photo of sks dog", width=64, height=64, steps=3,
                              seed=11, cfg_scale=4.0, sampler="euler", negative_prompt="blue")
    base, with_lora, base_again = TryIt(device="cpu").compare(request, [
        LoraChoice(None), LoraChoice(str(Path(settings.output_dir) / "tiny.safetensors"), 1.0), LoraChoice(None)])
    pixels = [np.asarray(images[0], dtype=np.float64) for images in (base, with_lora, base_again)]
    assert np.abs(pixels[1] - pixels[0]).mean() > 0 and np.array_equal(pixels[0], pixels[2])


def test_inspect_names_the_family_and_verify_matches_every_module(folder_run, tiny_sd3_dir, tiny_sd3_files):
    from trainer.tools import verify_lora
    from trainer.tools.lora_file import read_lora
    from trainer.tools.lora_info import family_from_keys

    settings, _ = folder_run
    path = Path(settings.output_dir) / "tiny.safetensors"
    count = len(lora_keys(path)[0])
    assert family_from_keys(read_lora(path)) == "sd3"
    for base in (tiny_sd3_dir, tiny_sd3_files["full"]):
        report = verify_lora(path, base)
        assert report.ok and f"{count} of {count} modules match" in report.format(), report.format()


def test_trains_headless_from_a_config_file(tiny_sd3_files, images, tmp_path):
    import json
    import subprocess
    import sys

    settings = sd3_settings(tiny_sd3_files["full"], images, tmp_path / "out", max_train_steps=1)
    config = tmp_path / "sd3.json"
    config.write_text(json.dumps(settings.model_dump(mode="json")))
    done = subprocess.run([sys.executable, "-m", "trainer", "train", "--config", str(config)], capture_output=True,
                          text=True, cwd=Path(__file__).parent.parent, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert lora_keys(tmp_path / "out" / "tiny.safetensors")[1]["ss_network_module"] == "networks.lora_sd3"


def test_try_it_loads_a_sai_file_and_its_separate_encoders_from_the_form(folder_run, tiny_sd3_files):
    from app.tab_common import model_flags
    from trainer.inference import GenerateRequest, LoraChoice, TryIt

    settings, _ = folder_run
    files = tiny_sd3_files
    form = {"sd3_checkbox": True, "clip_skip": 1, "v_parameterization": False, "sd3_clip_l": str(files["clip_l"]),
            "clip_g": str(files["clip_g"]), "sd3_t5xxl": str(files["t5xxl"]), "clip_l": "/flux/only/clip_l.safetensors"}
    request = GenerateRequest(base_model=str(files["bare"]), prompt="a photo of sks dog", width=64, height=64,
                              steps=2, seed=3, cfg_scale=1.0, sampler="euler", **model_flags(form))
    assert dict(request.model_files) == {k: str(files[r]) for k, r in (("sd3_clip_l", "clip_l"), ("clip_g", "clip_g"),
                                                                        ("sd3_t5xxl", "t5xxl"))}
    [[image]] = TryIt(device="cpu").compare(request, [LoraChoice(str(Path(settings.output_dir) / "tiny.safetensors"))])
    assert image.size == (64, 64)
    assert model_flags({**form, "sd3_checkbox": False})["model_files"] == ()  # only for SD3 models
