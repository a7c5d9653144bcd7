"""A kohya_ss config trains as kohya_ss would, or the check names what differs (issue #16).

Every key kohya_ss's LoRA tab saves is a Nekoya setting the trainer reads, or the check warns naming it
and its value when it is not at an off value, or it is listed here as one that changes no SD run.
kohya_ss's own presets and test configs load and warn for exactly the settings they set that Nekoya
does not apply.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.preflight import check
from trainer.preflight.report import SettingNotApplied
from trainer.settings import TrainingSettings, is_setting, read_settings_file, setting_info
from trainer.settings.kohya_json import settings_from_dict
from trainer.settings.kohya_unused import NONE, OTHER, SD, is_kohya_unused, kohya_key

DATA = Path(__file__).parent / "data"

# kohya_ss's LoRA tab, FIELD_REGISTRY in kohya_gui/lora_gui.py at commit 45088f04af78e11cec5407ff4652ea3ed2c14422:
# the keys it saves in a config, in its order.
KOHYA_LORA_TAB_KEYS = """
    pretrained_model_name_or_path v2 v_parameterization sdxl flux1_checkbox dataset_config save_model_as
    save_precision train_data_dir output_name model_list training_comment logging_dir reg_data_dir output_dir
    max_resolution learning_rate lr_scheduler lr_warmup lr_warmup_steps train_batch_size epoch save_every_n_epochs
    seed cache_latents cache_latents_to_disk train_inpainting caption_extension enable_bucket
    stop_text_encoder_training min_bucket_reso max_bucket_reso max_train_epochs max_train_steps
    lr_scheduler_num_cycles lr_scheduler_power optimizer optimizer_args lr_scheduler_args lr_scheduler_type
    max_grad_norm mixed_precision num_cpu_threads_per_process num_processes num_machines multi_gpu gpu_ids
    main_process_port dynamo_backend dynamo_mode dynamo_use_fullgraph dynamo_use_dynamic
    extra_accelerate_launch_args gradient_checkpointing fp8_base fp8_base_unet full_fp16 highvram lowvram xformers
    shuffle_caption save_state save_state_on_train_end resume prior_loss_weight color_aug flip_aug masked_loss
    clip_skip gradient_accumulation_steps mem_eff_attn max_token_length max_data_loader_n_workers keep_tokens
    persistent_data_loader_workers bucket_no_upscale random_crop bucket_reso_steps v_pred_like_loss
    caption_dropout_every_n_epochs caption_dropout_rate noise_offset_type noise_offset noise_offset_random_strength
    adaptive_noise_scale multires_noise_iterations multires_noise_discount ip_noise_gamma
    ip_noise_gamma_random_strength additional_parameters loss_type huber_schedule huber_c huber_scale vae_batch_size
    min_snr_gamma save_every_n_steps save_last_n_steps save_last_n_steps_state save_last_n_epochs
    save_last_n_epochs_state skip_cache_check log_with wandb_api_key wandb_run_name log_tracker_name
    log_tracker_config log_config scale_v_pred_loss_like_noise_pred full_bf16 min_timestep max_timestep vae
    weighted_captions debiased_estimation_loss sdxl_cache_text_encoder_outputs sdxl_no_half_vae text_encoder_lr
    t5xxl_lr unet_lr network_dim network_weights dim_from_weights network_alpha LoRA_type factor bypass_mode dora_wd
    use_cp use_tucker use_scalar rank_dropout_scale constrain rescaled train_norm decompose_both train_on_input
    conv_dim conv_alpha sample_every_n_steps sample_every_n_epochs sample_sampler sample_prompts down_lr_weight
    mid_lr_weight up_lr_weight block_lr_zero_threshold block_dims block_alphas conv_block_dims conv_block_alphas
    unit scale_weight_norms network_dropout rank_dropout module_dropout LyCORIS_preset loraplus_lr_ratio
    loraplus_text_encoder_lr_ratio loraplus_unet_lr_ratio train_lora_ggpo ggpo_sigma ggpo_beta huggingface_repo_id
    huggingface_token huggingface_repo_type huggingface_repo_visibility huggingface_path_in_repo
    save_state_to_huggingface resume_from_huggingface async_upload metadata_author metadata_description
    metadata_license metadata_tags metadata_title flux1_cache_text_encoder_outputs
    flux1_cache_text_encoder_outputs_to_disk model_type ae clip_l t5xxl discrete_flow_shift model_prediction_type
    timestep_sampling split_mode train_blocks t5xxl_max_token_length enable_all_linear guidance_scale mem_eff_save
    apply_t5_attn_mask split_qkv train_t5xxl cpu_offload_checkpointing blocks_to_swap single_blocks_to_swap
    double_blocks_to_swap show_timesteps show_timesteps_resolution img_attn_dim img_mlp_dim img_mod_dim single_dim
    txt_attn_dim txt_mlp_dim txt_mod_dim single_mod_dim in_dims train_double_block_indices
    train_single_block_indices sd3_cache_text_encoder_outputs sd3_cache_text_encoder_outputs_to_disk
    sd3_fused_backward_pass clip_g clip_g_dropout_rate sd3_clip_l sd3_clip_l_dropout_rate
    sd3_disable_mmap_load_safetensors sd3_enable_scaled_pos_embed logit_mean logit_std mode_scale
    pos_emb_random_crop_rate save_clip save_t5xxl sd3_t5_dropout_rate sd3_t5xxl t5xxl_device t5xxl_dtype
    sd3_text_encoder_batch_size weighting_scheme sd3_checkbox hunyuan_image_cache_text_encoder_outputs
    hunyuan_image_cache_text_encoder_outputs_to_disk hunyuan_text_encoder hunyuan_byt5 hunyuan_vae
    hunyuan_discrete_flow_shift hunyuan_model_prediction_type hunyuan_timestep_sampling hunyuan_sigmoid_scale
    hunyuan_attn_mode hunyuan_split_attn hunyuan_fp8_scaled hunyuan_fp8_vl hunyuan_text_encoder_cpu
    hunyuan_vae_chunk_size hunyuan_image_checkbox anima_cache_text_encoder_outputs
    anima_cache_text_encoder_outputs_to_disk anima_qwen3 anima_vae anima_llm_adapter_path anima_t5_tokenizer_path
    anima_discrete_flow_shift anima_timestep_sampling anima_sigmoid_scale anima_qwen3_max_token_length
    anima_t5_max_token_length anima_attn_mode anima_split_attn anima_vae_chunk_size anima_vae_disable_cache
    anima_unsloth_offload_checkpointing anima_qwen_image_vae_2d anima_compile anima_torch_compile
    anima_compile_backend anima_compile_mode anima_compile_dynamic anima_compile_fullgraph
    anima_compile_cache_size_limit anima_checkbox lumina_cache_text_encoder_outputs
    lumina_cache_text_encoder_outputs_to_disk lumina_gemma2 lumina_ae lumina_discrete_flow_shift
    lumina_model_prediction_type lumina_timestep_sampling lumina_sigmoid_scale lumina_gemma2_max_token_length
    lumina_system_prompt lumina_use_flash_attn lumina_use_sage_attn lumina_checkbox
""".split()

# Keys that do not apply to SD 1.x/2.x/SDXL: kohya_ss passes them to sd-scripts only for another family.
NOT_FOR_SD = {
    # the Flux.1 keys Nekoya applies are settings (trainer/settings/tab_flux.py); these it does not apply yet
    "Flux.1 (flux_train_network.py, networks.lora_flux)": """
        enable_all_linear mem_eff_save
        cpu_offload_checkpointing single_blocks_to_swap double_blocks_to_swap fp8_base_unet train_lora_ggpo
        ggpo_sigma ggpo_beta""",
    # the SD3 keys Nekoya applies are settings (trainer/settings/tab_sd3.py); these it does not apply yet
    "SD3 (sd3_train_network.py)": """
        sd3_cache_text_encoder_outputs_to_disk sd3_fused_backward_pass
        sd3_disable_mmap_load_safetensors save_clip save_t5xxl
        t5xxl_device t5xxl_dtype sd3_text_encoder_batch_size""",
    "passed only with the Flux.1/SD3/HunyuanImage/Anima/Lumina checkbox": "blocks_to_swap show_timesteps "
                                                                          "show_timesteps_resolution",
    "HunyuanImage-2.1": " ".join(k for k in KOHYA_LORA_TAB_KEYS if k.startswith("hunyuan_") and "checkbox" not in k),
    "Anima": " ".join(k for k in KOHYA_LORA_TAB_KEYS if k.startswith("anima_") and "checkbox" not in k),
    "Lumina": " ".join(k for k in KOHYA_LORA_TAB_KEYS if k.startswith("lumina_") and "checkbox" not in k),
}
NOT_FOR_SD_KEYS = {key: why for why, keys in NOT_FOR_SD.items() for key in keys.split()}

# Keys that on their own change no kohya_ss run of SD 1.x/2.x/SDXL, or whose effect another key's warning names.
CHANGES_NO_SD_RUN = {
    "lowvram": "kohya_ss no longer passes it to sd-scripts",
    "stop_text_encoder_training": "kohya_ss resets it to 0 for LoRA; the network check notes it",
    "huggingface_token": "an upload detail; huggingface_repo_id warns",
    "huggingface_repo_type": "an upload detail; huggingface_repo_id warns",
    "huggingface_repo_visibility": "an upload detail; huggingface_repo_id warns",
    "huggingface_path_in_repo": "an upload detail; huggingface_repo_id warns",
    "save_state_to_huggingface": "an upload detail; huggingface_repo_id warns",
    "async_upload": "an upload detail; huggingface_repo_id warns",
    "persistent_data_loader_workers": "Nekoya's data workers are threads: no processes to keep",
    "train_blocks": "kohya_ss passes train_blocks=single only with split_mode, which Nekoya applies",
}

# What makes a key matter where another setting can make it do nothing.
ENABLERS = {"dynamo_backend": "inductor", "ip_noise_gamma": 0.1, "save_state": True, "save_every_n_steps": 10}


def _settings(values: dict) -> TrainingSettings:
    return settings_from_dict(values).settings


def _not_applied(report, key: str | None = None) -> list[SettingNotApplied]:
    return [p for p in report.warnings if isinstance(p, SettingNotApplied) and key in (None, p.field)]


def _non_off_value(key: str):
    """A value of ``key`` that Nekoya would not apply: a choice, a ticked box, a number or some text."""
    row = kohya_key(key)
    if is_setting(key):
        info = setting_info(key)
        candidates = [*(info.choices or ()), True, 2, "1"] if info.type is not bool else [True]
    else:
        default = row.off[0]
        candidates = [True] if isinstance(default, bool) else [2] if isinstance(default, (int, float)) else ["1"]
    return next(c for c in candidates if not row.is_off(c))


@pytest.mark.parametrize("key", KOHYA_LORA_TAB_KEYS)
def test_every_lora_tab_key_applies_or_is_named_by_the_check(key):
    row = kohya_key(key)
    if key in NOT_FOR_SD_KEYS:
        assert row is not None and row.scope == OTHER, key
    elif key in CHANGES_NO_SD_RUN:
        assert row is not None and row.scope == NONE, key
    elif row is None:  # a setting Nekoya declares and applies
        assert is_setting(key) and not setting_info(key).unused, f"{key}: neither applied nor named by the check"
    else:
        assert row.scope == SD, key
        value = _non_off_value(key)
        enablers = {other: ENABLERS[other] for other, _ in row.moot_when}
        report = check(_settings({key: value, **enablers}), deep=False)
        [warning] = _not_applied(report, key)
        assert warning.message.startswith(key) and warning.severity == "warning"
        assert json.dumps(value) in warning.message, warning.message
        assert f"set {key} to " in warning.fix
        assert not _not_applied(check(_settings(enablers), deep=False)), "an off value must not warn"


def test_the_lists_cover_the_lora_tab_and_nothing_else():
    assert len(KOHYA_LORA_TAB_KEYS) == len(set(KOHYA_LORA_TAB_KEYS)) == 287
    assert set(NOT_FOR_SD_KEYS) <= set(KOHYA_LORA_TAB_KEYS) and set(CHANGES_NO_SD_RUN) <= set(KOHYA_LORA_TAB_KEYS)


def test_a_default_config_warns_for_nothing_and_says_every_setting_applies():
    report = check(TrainingSettings(), deep=False)
    assert not _not_applied(report)
    assert report.settings_applied() == "Settings: every setting applies."


def test_a_setting_another_one_turns_off_does_not_warn():
    quiet = {"dynamo_mode": "max-autotune", "dynamo_backend": "no"}  # no Dynamo
    assert not _not_applied(check(_settings(quiet), deep=False))
    loud = _settings({**quiet, "dynamo_backend": "inductor"})
    assert {p.field for p in _not_applied(check(loud, deep=False))} == {"dynamo_mode"}


def test_kohya_ss_writes_off_values_in_several_forms():
    off = {"masked_loss": "False", "num_processes": "1", "gpu_ids": "0", "huggingface_repo_id": "False",
           "v_pred_like_loss": "0", "dynamo_mode": "default", "log_with": "tensorboard", "flux1_checkbox": False}
    assert not _not_applied(check(_settings(off), deep=False))


def test_additional_parameters_apply_as_their_settings_and_unknown_flags_are_refused():
    text = '--lr_scheduler_type "CosineAnnealingLR" --lr_scheduler_args "T_max=1000" "eta_min=0" ' \
           '--network_train_unet_only --max_grad_norm=0 --optimizer_args "weight_decay=0.01" "betas=0.9,0.99"'
    report = check(_settings({"additional_parameters": text}), deep=False)
    assert not _not_applied(report) and not [p for p in report.errors if p.field == "additional_parameters"]
    assert report.changes() == {"lr_scheduler_type": "CosineAnnealingLR", "lr_scheduler_args": "T_max=1000 eta_min=0",
                                "text_encoder_lr": 0.0, "max_grad_norm": 0.0,
                                "optimizer_args": "weight_decay=0.01 betas=0.9,0.99"}
    refused = check(_settings({"additional_parameters": "--deepspeed --max_grad_norm=x"}), deep=False)
    messages = [p.message for p in refused.errors if p.field == "additional_parameters"]
    assert any("--deepspeed has no Nekoya setting" in m for m in messages)
    assert any(m.startswith("--max_grad_norm x:") for m in messages)


def test_old_and_other_family_keys_are_still_kohya_keys():
    for key in ("lora_network_weights", "use_wandb", "no_token_padding", "save_as_bool", "flux1_clip_l",
                "sd3_new_option", "huggingface_new_option"):
        assert is_kohya_unused(key), key
    assert not is_kohya_unused("learning_rate_te") and not is_kohya_unused("no_such_key")


# --- kohya_ss's own configs -----------------------------------------------------------------------------------

PRESETS = sorted((DATA / "kohya_ss_presets").glob("*.json"))
TEST_CONFIGS = sorted((DATA / "kohya_ss_test_configs").glob("*.json"))
# The settings each config sets that Nekoya does not apply, and why that is expected.
EXPECTED = {
    "SDXL - 1 image LoRA v1.0": {},
    "SDXL - LoRA adafactor v1.0": {},
    "SDXL - LoRA finetuning phase 2_v1.1": {},
    "SDXL - LoRA kudou-reira dadaptadam v1.0": {},  # log_with wandb applies (an offline W&B run)
    "SDXL - LoRA kudou-reira dadaptadam v1.1": {},  # log_with wandb applies (an offline W&B run)
    "SDXL - LoRA kudou-reira prodigy v4.0": {},  # log_with wandb applies (an offline W&B run)
    "SDXL - edgLoRAXL AI_Now": {},
    "SDXL - edgLoRAXL": {},
    "sd15 - EDG_LoConOptiSettings": {"mem_eff_attn": "true"},
    "sd15 - EDG_LoHaOptiSettings": {"mem_eff_attn": "true"},
    "sd15 - EDG_LoraOptiSettings": {"mem_eff_attn": "true"},
    "sd15 - LoKr v2.0": {},
    # the *-toml configs' dataset_config TOML is not shipped here: the check errors naming it (test below)
    "Diag-OFT-AdamW8bit-toml": {},
    "DyLoRA-Adafactor-toml": {},
    "LoKR-AdamW8bit-toml": {},
    "locon-AdamW8bit-toml": {},
    "locon-AdamW8bit-masked_loss-toml": {},  # masked_loss applies (the alpha channel weights the loss)
    "loha-Prodigy": {},
    "t5clrs": {},  # its --optimizer_args apply, and bucket_reso_steps 256, which sd-scripts takes
}


def test_the_test_configs_are_kohya_ss_sd_lora_configs():
    assert len(TEST_CONFIGS) == 14
    for path in TEST_CONFIGS:
        data = json.loads(path.read_text())
        assert "network_dim" in data and not data.get("flux1_checkbox") and not data.get("sd3_checkbox"), path.name
    assert set(EXPECTED) <= {p.stem for p in PRESETS + TEST_CONFIGS}


@pytest.mark.parametrize("path", PRESETS + TEST_CONFIGS, ids=lambda p: p.stem)
def test_kohya_ss_config_warns_for_exactly_the_settings_not_applied(path):
    settings = read_settings_file(path).settings
    report = check(settings, deep=False)
    assert not [p for p in report.errors if "failed unexpectedly" in p.message], report.format()
    expected = EXPECTED.get(path.stem, {})
    assert {p.field for p in _not_applied(report)} == set(expected), report.format()
    n = len(expected)
    assert report.settings_applied() == ("Settings: every setting applies." if not n else
                                         f"Settings: {n} kohya_ss setting{'s are' if n > 1 else ' is'} not applied: "
                                         "see the warnings.")


@pytest.mark.parametrize("path", [p for p in TEST_CONFIGS if p.stem.endswith("-toml")], ids=lambda p: p.stem)
def test_a_missing_dataset_config_toml_is_an_error_naming_the_field_and_the_file(path):
    settings = read_settings_file(path).settings
    report = check(settings, deep=False)
    toml = json.loads(path.read_text())["dataset_config"]
    [error] = [p for p in report.errors if p.field == "dataset_config"]
    assert error.file == toml and f"dataset_config {toml} does not exist" in error.message
    assert not [p for p in report.errors if p.field in ("train_data_dir", "reg_data_dir")], report.format()


def test_bucket_steps_follow_sd_scripts_not_kohya_ss_s_slider():
    settings = read_settings_file(DATA / "kohya_ss_test_configs" / "t5clrs.json").settings
    assert settings.bucket_reso_steps == 256


# --- the step plan's word on the settings ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from trainer.devtools.images import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("fidelity") / "img", {"2_sks dog": 2}, sizes=[(64, 64)], seed=1)


def test_the_step_plan_says_every_setting_applies_for_a_plain_config(folder):
    report = check(_settings({"train_data_dir": str(folder)}), deep=False)
    plan = report.format().split("Step plan:\n", 1)[1]
    assert "  Settings: every setting applies.\n" in plan


@pytest.mark.parametrize("ignored, line", [
    ({"log_config": True}, "Settings: 1 kohya_ss setting is not applied: see the warnings."),
    ({"mem_eff_attn": True, "log_config": True, "additional_parameters": "--max_grad_norm=0"},
     "Settings: 2 kohya_ss settings are not applied: see the warnings."),
])
def test_the_step_plan_counts_the_settings_not_applied(folder, ignored, line):
    report = check(_settings({"train_data_dir": str(folder), **ignored}), deep=False)
    assert report.settings_applied() == line
    assert f"  {line}\n" in report.format().split("Step plan:\n", 1)[1]


def test_the_run_plan_says_it_for_the_run_log():
    from trainer.run_plan import RunPlan

    ignored = SettingNotApplied("warning", "masked_loss", "masked_loss = true is not applied: ...")
    plan = RunPlan(*[None] * 7, findings=(ignored,))
    assert plan.settings_applied == "Settings: 1 kohya_ss setting is not applied: see the warnings."
    assert RunPlan(*[None] * 7).settings_applied == "Settings: every setting applies."
