"""kohya_ss config keys that Nekoya reads but does not use (other model families,
accelerate launch options, trackers, LyCORIS options...). They are kept and written back
on save, and reported apart from truly unknown keys."""

KOHYA_UNUSED_KEYS = frozenset({
    # Also the img_attn_dim-style Flux block dims and the anima_/hunyuan_/lumina_ families.
    'img_attn_dim', 'img_mlp_dim', 'img_mod_dim', 'single_dim', 'txt_attn_dim', 'txt_mlp_dim',
    'txt_mod_dim', 'single_mod_dim', 'in_dims', 'flux1_cache_text_encoder_outputs',
    'flux1_cache_text_encoder_outputs_to_disk', 'sd3_cache_text_encoder_outputs',
    'sd3_cache_text_encoder_outputs_to_disk',
    'additional_parameters', 'ae',
    'anima_checkbox', 'apply_t5_attn_mask', 'async_upload',
    'blocks_to_swap', 'cache_text_encoder_outputs',
    'caption_metadata_filename', 'class_prompt', 'clip_g', 'clip_g_dropout_rate', 'clip_l',
    'cpu_offload_checkpointing', 'dataset_config',
    'discrete_flow_shift', 'double_blocks_to_swap',
    'dynamo_mode', 'dynamo_use_dynamic', 'dynamo_use_fullgraph', 'enable_all_linear',
    'extra_accelerate_launch_args', 'file_path', 'flux1_checkbox',
    'fp8_base', 'fp8_base_unet', 'ggpo_beta', 'ggpo_sigma', 'gpu_ids', 'guidance_scale',
    'highvram', 'huggingface_path_in_repo', 'huggingface_repo_id', 'huggingface_repo_type',
    'huggingface_repo_visibility', 'huggingface_token', 'hunyuan_image_checkbox', 'images_folder',
    'instance_prompt', 'ip_noise_gamma_random_strength', 'latent_metadata_filename', 'log_config',
    'log_tracker_config', 'log_tracker_name', 'logit_mean', 'logit_std', 'lora_network_weights',
    'lowvram',
    'lumina_checkbox', 'main_process_port', 'masked_loss', 'mem_eff_attn', 'mem_eff_save',
    'mode_scale', 'model_prediction_type', 'model_type', 'multi_gpu',
    'no_token_padding', 'num_machines', 'num_processes', 'pos_emb_random_crop_rate',
    'reg_images_folder', 'resume_from_huggingface',
    'save_as_bool', 'save_clip', 'save_last_n_steps_state', 'save_state_to_huggingface', 'save_t5xxl',
    'sd3_checkbox', 'sd3_clip_l', 'sd3_clip_l_dropout_rate', 'sd3_disable_mmap_load_safetensors',
    'sd3_enable_scaled_pos_embed', 'sd3_fused_backward_pass', 'sd3_t5_dropout_rate', 'sd3_t5xxl',
    'sd3_text_encoder_batch_size', 'show_timesteps', 'show_timesteps_resolution',
    'single_blocks_to_swap', 'skip_cache_check', 'split_mode', 'split_qkv',
    'stop_text_encoder_training_pct', 't5xxl', 't5xxl_device', 't5xxl_dtype', 't5xxl_lr',
    't5xxl_max_token_length', 'timestep_sampling', 'train_blocks', 'train_double_block_indices',
    'train_inpainting', 'train_lora_ggpo', 'train_single_block_indices',
    'train_t5xxl', 'use_8bit_adam',
    'use_wandb', 'v_pred_like_loss', 'wandb_api_key', 'wandb_run_name', 'weighted_captions',
    'weighting_scheme'
})

_UNUSED_PREFIXES = ("anima_", "hunyuan_", "lumina_", "huggingface_", "wandb_", "flux1_", "sd3_")


def is_kohya_unused(key: str) -> bool:
    return key in KOHYA_UNUSED_KEYS or key.startswith(_UNUSED_PREFIXES)
