"""The settings model and kohya_ss JSON configs: load, migrate, validate, save."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.settings import (
    TABS,
    SettingsError,
    TrainingSettings,
    apply_overrides,
    read_settings_file,
    save_settings,
    setting_infos,
    settings_from_dict,
    settings_to_dict,
)

PRESETS = sorted(Path(__file__).resolve().parent.parent.joinpath("presets").glob("*.json"))

# A classic (v21/v22-era) kohya_ss LoRA config: string-typed numbers, "" for unset, old keys.
CLASSIC = {
    "LoRA_type": "Standard", "adaptive_noise_scale": 0, "additional_parameters": "", "block_alphas": "",
    "block_dims": "", "block_lr_zero_threshold": "", "bucket_no_upscale": False, "bucket_reso_steps": 64,
    "cache_latents": True, "cache_latents_to_disk": True, "caption_dropout_every_n_epochs": 0.0,
    "caption_dropout_rate": 0.05, "caption_extension": ".txt", "clip_skip": "1", "color_aug": False,
    "conv_alpha": 1, "conv_block_alphas": "", "conv_block_dims": "", "conv_dim": 1, "decompose_both": False,
    "dim_from_weights": False, "down_lr_weight": "", "enable_bucket": True, "epoch": 50, "factor": -1,
    "flip_aug": False, "full_fp16": False, "gradient_accumulation_steps": "1", "gradient_checkpointing": True,
    "keep_tokens": "0", "learning_rate": 3e-05, "logging_dir": "/data/log", "lora_network_weights": "/data/prev.safetensors",
    "lr_scheduler": "constant", "lr_scheduler_num_cycles": "", "lr_scheduler_power": "", "lr_warmup": 0,
    "max_data_loader_n_workers": "0", "max_resolution": "1024,1024", "max_timestep": 1000,
    "max_token_length": "75", "max_train_epochs": "50", "max_train_steps": "", "mem_eff_attn": False,
    "mid_lr_weight": "", "min_bucket_reso": 256, "min_snr_gamma": 5, "min_timestep": 0,
    "mixed_precision": "fp16", "model_list": "custom", "module_dropout": 0, "multires_noise_discount": 0,
    "multires_noise_iterations": 0, "network_alpha": 32, "network_dim": 32, "network_dropout": 0,
    "no_token_padding": False, "noise_offset": 0, "noise_offset_type": "Original",
    "num_cpu_threads_per_process": 2, "optimizer": "AdamW", "optimizer_args": "",
    "output_dir": "/data/model", "output_name": "my_lora", "persistent_data_loader_workers": False,
    "pretrained_model_name_or_path": "/models/sd_xl_base_1.0.safetensors", "prior_loss_weight": 1.0,
    "random_crop": False, "rank_dropout": 0, "reg_data_dir": "", "resume": "", "sample_every_n_epochs": 0,
    "sample_every_n_steps": 0, "sample_prompts": "", "sample_sampler": "euler_a", "save_every_n_epochs": 1,
    "save_every_n_steps": 0, "save_last_n_steps": 0, "save_last_n_steps_state": 0, "save_model_as": "safetensors",
    "save_precision": "fp16", "save_state": False, "scale_v_pred_loss_like_noise_pred": False,
    "scale_weight_norms": 0, "sdxl": True, "sdxl_cache_text_encoder_outputs": False, "sdxl_no_half_vae": True,
    "seed": "", "shuffle_caption": False, "stop_text_encoder_training_pct": 0, "text_encoder_lr": 3e-05,
    "train_batch_size": 3, "train_data_dir": "/data/img", "train_on_input": True,
    "training_comment": "3 repeats. More info: civitai article 1771", "unet_lr": 3e-05, "unit": 1,
    "up_lr_weight": "", "use_cp": False, "use_wandb": "True", "v2": False, "v_parameterization": False,
    "vae_batch_size": 0, "wandb_api_key": "", "weighted_captions": False, "xformers": True,
}

# A current (v25/v26) config: real types, new keys, other-family keys Nekoya does not use.
CURRENT = {
    "LoRA_type": "Kohya LoCon", "LyCORIS_preset": "full", "adaptive_noise_scale": 0.0, "async_upload": False,
    "bucket_no_upscale": True, "bucket_reso_steps": 64, "cache_latents": True, "caption_extension": ".caption",
    "clip_skip": 2, "conv_alpha": 4, "conv_dim": 8, "dataset_config": "", "debiased_estimation_loss": False,
    "dynamo_backend": "no", "dynamo_mode": "default", "enable_bucket": True, "epoch": 10, "flux1_checkbox": False,
    "fp8_base": False, "full_bf16": True, "gpu_ids": "", "huber_c": 0.1, "huber_schedule": "snr",
    "huggingface_repo_id": "", "ip_noise_gamma": 0.1, "learning_rate": 0.0005, "log_with": "tensorboard",
    "loss_type": "l2", "lr_scheduler": "cosine_with_restarts", "lr_scheduler_args": "", "lr_scheduler_num_cycles": 3,
    "lr_scheduler_power": 1.0, "lr_scheduler_type": "", "lr_warmup": 10, "lr_warmup_steps": 0,
    "main_process_port": 0, "max_bucket_reso": 1536, "max_grad_norm": 1.0, "max_resolution": "768,768",
    "max_token_length": 225, "max_train_epochs": 0, "max_train_steps": 0, "metadata_author": "me",
    "metadata_title": "Cat", "min_bucket_reso": 320, "mixed_precision": "bf16", "model_list": "",
    "multi_gpu": False, "multires_noise_discount": 0.3, "multires_noise_iterations": 8, "network_alpha": 16,
    "network_dim": 32, "noise_offset_type": "Multires", "num_processes": 1,
    "optimizer": "Prodigy", "optimizer_args": "d_coef=1.0 weight_decay=0.01 safeguard_warmup=False",
    "output_name": "cat", "pretrained_model_name_or_path": "/models/v2-1_768.safetensors",
    "sample_prompts": "a cat --w 768 --h 768 --d 1\na dog --n blurry", "sample_sampler": "dpmsolver++",
    "save_as_bool": False, "save_last_n_epochs": 3, "save_precision": "bf16", "sd3_checkbox": False,
    "seed": 1234, "t5xxl_lr": 0, "text_encoder_lr": 1.0, "train_batch_size": 4, "unet_lr": 1.0,
    "v2": True, "v_parameterization": True, "wandb_run_name": "", "xformers": "sdpa",
}


def test_classic_kohya_config_loads_without_losing_values(tmp_path):
    path = tmp_path / "classic.json"
    path.write_text(json.dumps(CLASSIC))
    report = read_settings_file(path)
    s = report.settings
    assert (s.learning_rate, s.clip_skip, s.gradient_accumulation_steps, s.max_train_epochs) == (3e-05, 1, 1, 50)
    assert (s.seed, s.max_train_steps, s.lr_scheduler_num_cycles, s.lr_scheduler_power) == (0, 0, 1, 1.0)
    assert s.network_weights == "/data/prev.safetensors"  # lora_network_weights migrated
    assert s.xformers == "xformers"  # boolean migrated
    assert s.log_with == "wandb"  # use_wandb migrated
    assert s.stop_text_encoder_training == 0
    assert s.resolution == (1024, 1024) and s.sdxl and s.sdxl_no_half_vae
    assert s.training_comment == "3 repeats. More info: civitai article 1771"
    assert "use_wandb" not in s.kept_kohya_values()
    # Every key is either a setting with its value or kept aside and saved back.
    saved = settings_to_dict(s)
    migrated = {"lora_network_weights", "use_wandb", "stop_text_encoder_training_pct", "xformers"}
    for key, value in CLASSIC.items():
        if key in migrated:
            continue
        assert key in saved, key
        if value != "":
            assert _same(saved[key], value), (key, saved[key], value)
    assert "no_token_padding" in report.unused_keys and not report.unknown_keys


def test_current_kohya_config_loads_and_reports_unused_keys():
    report = settings_from_dict(CURRENT)
    s = report.settings
    for key, value in CURRENT.items():
        got = getattr(s, key) if key in TrainingSettings.model_fields else s.kept_kohya_values()[key]
        if key == "model_list" and value == "":
            continue
        assert _same(got, value), (key, got, value)
    assert set(report.unused_keys) >= {"huggingface_repo_id"}  # flux1_checkbox, sd3_checkbox and gpu_ids apply
    assert report.unknown_keys == []
    assert s.optimizer_kwargs() == {"d_coef": "1.0", "weight_decay": "0.01", "safeguard_warmup": "False"}


def test_unknown_keys_are_kept_and_reported_in_one_warning():
    report = settings_from_dict({"network_dim": 4, "my_custom_flag": 3, "another": "x"})
    assert report.unknown_keys == ["another", "my_custom_flag"]
    warnings = report.warnings()
    assert len(warnings) == 1 and "another" in warnings[0] and "my_custom_flag" in warnings[0]
    assert settings_to_dict(report.settings)["my_custom_flag"] == 3


@pytest.mark.parametrize("data", [CLASSIC, CURRENT, {}], ids=["classic", "current", "defaults"])
def test_save_then_load_gives_back_the_same_settings(tmp_path, data):
    first = settings_from_dict(data).settings
    path = save_settings(first, tmp_path / "out.json")
    text = path.read_text()
    assert list(json.loads(text)) == sorted(json.loads(text))  # sorted keys
    second = read_settings_file(path).settings
    assert second == first
    assert settings_to_dict(second) == settings_to_dict(first)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_every_invalid_value_is_reported_at_once_naming_the_field():
    bad = {
        "train_batch_size": "lots", "learning_rate": -0.1, "lr_scheduler": "sometimes", "network_dim": 0,
        "max_resolution": "big", "output_name": "../escape", "optimizer_args": "relative_step = True",
        "min_bucket_reso": 1024, "max_bucket_reso": 512, "mixed_precision": "fp64",
    }
    with pytest.raises(SettingsError) as err:
        settings_from_dict(bad)
    problems = err.value.lines
    del bad["min_bucket_reso"]  # valid alone; the max below it is the problem
    assert len(problems) == len(bad)
    for key, value in bad.items():
        line = next(p for p in problems if p.startswith(key + " "))
        assert repr(value) in line
    assert "choose 'no', 'fp16', 'bf16'" in next(p for p in problems if p.startswith("mixed_precision"))
    assert "from 1 to 64" in next(p for p in problems if p.startswith("train_batch_size"))


def test_partial_preset_layers_over_current_values():
    base = settings_from_dict({"train_data_dir": "/data/img", "network_dim": 64}).settings
    layered = settings_from_dict({"network_dim": 8, "optimizer": "Lion", "seed": None}, base=base).settings
    assert (layered.train_data_dir, layered.network_dim, layered.optimizer) == ("/data/img", 8, "Lion")


def test_cli_style_overrides():
    s = apply_overrides(TrainingSettings(), ["network_dim=16", "learning_rate=5e-5", "flip_aug=true"])
    assert (s.network_dim, s.learning_rate, s.flip_aug) == (16, 5e-5, True)
    with pytest.raises(SettingsError, match="no such setting"):
        apply_overrides(s, ["netwrk_dim=4"])


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_shipped_preset_loads_cleanly(path):
    report = read_settings_file(path)
    assert report.unknown_keys == [] and report.unused_keys == [] and report.notes == []
    assert json.loads(path.read_text()) == dict(sorted(json.loads(path.read_text()).items()))


def test_shipped_presets_cover_the_promised_recipes():
    names = {p.stem for p in PRESETS}
    assert len(PRESETS) >= 4
    walkthrough = read_settings_file(next(p for p in PRESETS if "walkthrough" in p.stem.lower())).settings
    assert (walkthrough.network_dim, walkthrough.network_alpha, walkthrough.optimizer) == (512, 50, "Adafactor")
    assert (walkthrough.learning_rate, walkthrough.resolution, walkthrough.train_batch_size, walkthrough.lr_warmup) == (1e-4, (1024, 1024), 1, 0)
    assert any("8GB" in n for n in names) and any("SDXL" in n for n in names) and any("Quick" in n for n in names)


def test_every_setting_is_fully_described():
    infos = setting_infos()
    assert len(infos) == len(TrainingSettings.model_fields)
    for info in infos:
        assert info.label and info.tab in TABS, info.key
        if info.choices is not None:
            assert info.default in info.choices, info.key
        if info.ge is not None and isinstance(info.default, (int, float)):
            assert info.default >= info.ge, info.key
    tabs_in_order = [i.tab for i in infos]
    assert tabs_in_order == sorted(tabs_in_order, key=TABS.index)
    assert {i.tab for i in infos} == set(TABS)


def test_defaults_follow_kohya_ss_lora_tab():
    s = TrainingSettings()
    expected = {
        "train_batch_size": 1, "epoch": 1, "save_every_n_epochs": 1, "caption_extension": ".txt",
        "mixed_precision": "fp16", "save_precision": "fp16", "cache_latents": True, "learning_rate": 1e-4,
        "unet_lr": 1e-4, "text_encoder_lr": 1e-4, "lr_scheduler": "cosine", "lr_warmup": 10, "optimizer": "AdamW8bit",
        "max_resolution": "512,512", "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 2048,
        "network_dim": 8, "network_alpha": 1, "LoRA_type": "Standard", "clip_skip": 1, "bucket_no_upscale": True,
        "bucket_reso_steps": 64, "multires_noise_discount": 0.3, "max_token_length": 75, "output_name": "last",
        "save_model_as": "safetensors", "num_cpu_threads_per_process": 2, "max_grad_norm": 1.0,
    }
    for key, value in expected.items():
        assert getattr(s, key) == value, key


def _same(a, b) -> bool:
    if isinstance(b, str) and not isinstance(a, str):
        try:
            return float(a) == float(b)
        except ValueError:
            return str(a).lower() == b.lower()
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b
