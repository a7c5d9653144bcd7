"""End-to-end SDXL LoRA training on the tiny random SDXL model (CPU, 64 px, a few steps)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import trainer.families.sdxl  # noqa: F401  (registers the SDXL family)
from test_sdxl_names import expected_te_names, expected_unet_names
from trainer import events as ev
from trainer.loop import train
from trainer.settings import TrainingSettings
from trainer.settings.kohya_json import settings_from_dict

pytestmark = pytest.mark.slow  # trains the tiny SDXL model end to end

# kohya_ss presets/lora/"SDXL - LoRA AI_characters standard v1.1.json", with the keys and the
# v21/22-era value forms described in kohya_ss_gui.md §2.2 (string numbers, legacy keys).
AI_CHARACTERS_V11 = {
    "LoRA_type": "Standard", "adaptive_noise_scale": 0, "additional_parameters": "", "block_alphas": "",
    "block_dims": "", "block_lr_zero_threshold": "", "bucket_no_upscale": False, "bucket_reso_steps": 64,
    "cache_latents": True, "cache_latents_to_disk": True, "caption_dropout_every_n_epochs": 0.0,
    "caption_dropout_rate": 0.05, "caption_extension": ".txt", "clip_skip": "1", "color_aug": False,
    "conv_alpha": 1, "conv_block_alphas": "", "conv_block_dims": "", "conv_dim": 1, "decompose_both": False,
    "dim_from_weights": False, "down_lr_weight": "", "enable_bucket": True, "epoch": 50, "factor": -1,
    "flip_aug": False, "full_fp16": False, "gradient_accumulation_steps": "1", "gradient_checkpointing": True,
    "keep_tokens": "0", "learning_rate": 3e-05, "log_with": "", "lora_network_weights": "", "lr_scheduler": "constant",
    "lr_scheduler_num_cycles": "", "lr_scheduler_power": "", "lr_warmup": 0, "max_bucket_reso": 2048,
    "max_data_loader_n_workers": "0", "max_resolution": "1024,1024", "max_timestep": 1000, "max_token_length": "75",
    "max_train_epochs": "50", "max_train_steps": "", "mem_eff_attn": False, "mid_lr_weight": "",
    "min_bucket_reso": 256, "min_snr_gamma": 5, "min_timestep": 0, "mixed_precision": "fp16", "module_dropout": 0,
    "multires_noise_discount": 0, "multires_noise_iterations": 0, "network_alpha": 32, "network_dim": 32,
    "network_dropout": 0, "no_token_padding": False, "noise_offset": 0, "noise_offset_type": "Original",
    "num_cpu_threads_per_process": 2, "optimizer": "AdamW", "optimizer_args": "", "persistent_data_loader_workers": False,
    "prior_loss_weight": 1.0, "random_crop": False, "rank_dropout": 0, "save_every_n_epochs": 1,
    "save_every_n_steps": 0, "save_last_n_steps": 0, "save_last_n_steps_state": 0, "save_precision": "fp16",
    "scale_v_pred_loss_like_noise_pred": False, "scale_weight_norms": 0, "sdxl": True,
    "sdxl_cache_text_encoder_outputs": False, "sdxl_no_half_vae": True, "seed": "", "shuffle_caption": False,
    "stop_text_encoder_training_pct": 0, "text_encoder_lr": 3e-05, "train_batch_size": 3, "train_on_input": True,
    "training_comment": "3 repeats. More info: https://civitai.com/articles/1771", "unet_lr": 3e-05, "unit": 1,
    "up_lr_weight": "", "use_cp": False, "v2": False, "v_parameterization": False, "vae_batch_size": 0,
    "weighted_captions": False, "xformers": "xformers",
}


class Recorder(list):
    def of(self, kind):
        return [e for e in self if isinstance(e, kind)]

    def logs(self) -> str:
        return "\n".join(e.message for e in self.of(ev.Log))


def sdxl_settings(model, images, out, **overrides) -> TrainingSettings:
    values = dict(
        pretrained_model_name_or_path=str(model), sdxl=True, train_data_dir=str(images), output_dir=str(out),
        output_name="xl", max_resolution="64,64", enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128,
        bucket_reso_steps=32, train_batch_size=1, max_train_steps=2, learning_rate=1e-2, unet_lr=1e-2,
        text_encoder_lr=1e-3, optimizer="AdamW", lr_scheduler="constant", lr_warmup=0, network_dim=4,
        network_alpha=4, seed=7, save_every_n_epochs=0, mixed_precision="no", save_precision="float",
        cache_latents=True,
    )
    values.update(overrides)
    return TrainingSettings(**values)


def run(settings) -> tuple[Recorder, object]:
    recorder = Recorder()
    result = train(settings, recorder.append)
    assert result.status == "finished", result.error
    return recorder, result


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A 64 px and a 96x64 px image (two buckets, so two size conditionings)."""
    from trainer.devtools.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("sdxl_images") / "img"
    return make_image_folder(root, {"1_sks dog": 2}, sizes=[(64, 64), (96, 64)], seed=5)


@pytest.fixture(scope="module")
def folder_run(tiny_sdxl_dir, images, tmp_path_factory):
    """Diffusers folder, LoCon (conv keys too), UNet and both text encoders trained."""
    out = tmp_path_factory.mktemp("sdxl_folder_run")
    settings = sdxl_settings(tiny_sdxl_dir, images, out, LoRA_type="Kohya LoCon", conv_dim=2, conv_alpha=1)
    return (settings, *run(settings))


@pytest.fixture(scope="module")
def file_run(tiny_sdxl_file, images, tmp_path_factory):
    """Single SGM-layout file, standard LoRA, gradient checkpointing."""
    out = tmp_path_factory.mktemp("sdxl_file_run")
    settings = sdxl_settings(tiny_sdxl_file, images, out, gradient_checkpointing=True)
    return (settings, *run(settings))


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_dir):
    """diffusers' SDXL pipeline of the tiny model, and its output without a LoRA."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, render(pipe)


def render(pipe):
    return pipe("sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def final_file(settings) -> str:
    return os.path.join(settings.output_dir, f"{settings.output_name}.safetensors")


@pytest.mark.parametrize("which, with_conv", [("folder_run", True), ("file_run", False)])
def test_key_set_is_sd_scripts_sdxl_module_list(request, which, with_conv, tiny_sdxl_dir):
    from trainer.checkpoints import load_pipeline_components

    settings, recorder, result = request.getfixturevalue(which)
    assert [s.step for s in recorder.of(ev.Step)] == [1, 2]
    parts = load_pipeline_components(tiny_sdxl_dir, family_hint="sdxl")
    expected = (expected_unet_names(parts.unet, with_conv) | expected_te_names("lora_te1", parts.text_encoders[0])
                | expected_te_names("lora_te2", parts.text_encoders[1]))
    tensors = load_file(final_file(settings))
    assert {key.split(".")[0] for key in tensors} == expected
    assert len(tensors) == 3 * len(expected)


def test_metadata_says_sdxl(folder_run):
    settings, _, _ = folder_run
    with safe_open(final_file(settings), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"


@pytest.mark.parametrize("which", ["folder_run", "file_run"])
def test_trained_file_loads_in_diffusers_sdxl_and_changes_output(request, which, sdxl_pipe):
    settings, _, _ = request.getfixturevalue(which)
    pipe, base = sdxl_pipe
    pipe.load_lora_weights(final_file(settings), adapter_name=which)
    try:
        assert abs(render(pipe) - base).mean() > 1e-4
    finally:
        pipe.unload_lora_weights()


def test_cached_text_encoder_outputs_give_the_same_first_loss(folder_run, tiny_sdxl_dir, images, tmp_path):
    """At step 1 every LoRA is zero, so caching the text encoders' outputs must not change the loss."""
    settings, recorder, _ = folder_run
    cached = sdxl_settings(tiny_sdxl_dir, images, tmp_path, LoRA_type="Kohya LoCon", conv_dim=2, conv_alpha=1,
                           sdxl_cache_text_encoder_outputs=True, max_train_steps=1)
    cached_recorder, _ = run(cached)
    assert "text encoder outputs cached" in cached_recorder.logs()
    assert "text encoders are not trained" in cached_recorder.logs()
    first, first_cached = recorder.of(ev.Step)[0].loss, cached_recorder.of(ev.Step)[0].loss
    assert first_cached == pytest.approx(first, rel=1e-5)
    keys = {key.split(".")[0] for key in load_file(final_file(cached))}
    assert keys and all(k.startswith("lora_unet_") for k in keys)


def test_kohya_sdxl_preset_loads_and_trains(tiny_sdxl_dir, images, tmp_path):
    """kohya_ss's "SDXL - LoRA AI_characters standard v1.1" as is, with the tiny model and sizes substituted."""
    data = tmp_path / "img"
    shutil.copytree(images, data)  # cache_latents_to_disk writes .npz files beside the images
    tiny = {"pretrained_model_name_or_path": str(tiny_sdxl_dir), "train_data_dir": str(data),
            "output_dir": str(tmp_path / "out"), "output_name": "preset", "max_resolution": "64,64",
            "min_bucket_reso": 64, "max_bucket_reso": 128, "epoch": 1, "max_train_epochs": "1"}
    report = settings_from_dict({**AI_CHARACTERS_V11, **tiny})
    settings = report.settings
    assert settings.sdxl and settings.sdxl_no_half_vae and settings.gradient_checkpointing
    assert (settings.network_dim, settings.network_alpha, settings.clip_skip, settings.max_token_length) == (32, 32, 1, 75)
    recorder, result = run(settings)
    assert settings.train_batch_size == 3
    assert result.step == 1  # at the preset's bucket_reso_steps 64 both images share the 64x64 bucket: 1 batch
    assert list(data.rglob("*_sdxl.npz"))  # latents cached to disk under the SDXL suffix
    tensors = load_file(final_file(settings))
    prefixes = {key.split("_")[1] for key in tensors}
    assert prefixes == {"unet", "te1", "te2"}
    assert {t.dtype for t in tensors.values()} == {torch.float16}  # save_precision fp16
    assert "xformers" in recorder.logs()  # not usable on CPU: SDPA instead, with a message


def test_bf16_half_weights_train_sample_and_resume(tiny_sdxl_dir, images, tmp_path, monkeypatch):
    """The half-precision paths a GPU runs (bf16 frozen weights and VAE, full_bf16 LoRA, samples, saved
    state), on a CPU: the trainer picks bf16 where the CPU has bf16 instructions (forced here)."""
    from PIL import Image

    from trainer.preflight import device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    common = dict(mixed_precision="bf16", full_bf16=True, max_train_steps=0, epoch=2, save_every_n_epochs=1,
                  save_state=True, sample_every_n_epochs=1, sample_prompts="sks dog --w 64 --h 64 --s 2")
    whole = sdxl_settings(tiny_sdxl_dir, images, tmp_path / "whole", **common)
    recorder, _ = run(whole)
    assert "mixed precision bf16 on cpu: frozen weights bfloat16, LoRA weights bfloat16" in recorder.logs()
    samples = sorted((tmp_path / "whole" / "sample").glob("*.png"))
    assert len(samples) == 2
    for path in samples:
        pixels = torch.tensor(list(Image.open(path).convert("L").getdata()), dtype=torch.float32)
        assert pixels.std() > 1  # not a black or NaN image

    resumed = sdxl_settings(tiny_sdxl_dir, images, tmp_path / "resumed", **common,
                            resume=str(tmp_path / "whole" / "xl-000001-state"))
    resumed_recorder, _ = run(resumed)
    epoch_2 = [s.loss for s in recorder.of(ev.Step)][2:]
    assert [s.loss for s in resumed_recorder.of(ev.Step)] == epoch_2 and len(epoch_2) == 2
    a, b = load_file(final_file(whole)), load_file(final_file(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
