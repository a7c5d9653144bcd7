"""Settings of the Advanced and Samples tabs."""
from __future__ import annotations

from pydantic import BaseModel

from .field import setting

TAB = "Advanced"
SAMPLES = "Samples"
ONLY_WANDB = {"log_with": ("wandb", "all")}
TRAIN, CAPTION, NOISE, LOSS, SAVE, DATA = "Training", "Captions", "Noise", "Loss", "Saving and resume", "Data loading"

SAMPLERS = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)


ORIGINAL_NOISE = {"noise_offset_type": ("Original",)}
MULTIRES_NOISE = {"noise_offset_type": ("Multires",)}
HUBER_LOSS = {"loss_type": ("huber", "smooth_l1")}


class AdvancedSettings(BaseModel):
    # --- Training ------------------------------------------------------------
    gradient_accumulation_steps: int = setting(1, label="Gradient accumulate steps", tab=TAB, section=TRAIN, ge=1, le=120, step=1, widget="slider", ss_key="ss_gradient_accumulation_steps")
    gradient_checkpointing: bool = setting(False, label="Gradient checkpointing", tab=TAB, section=TRAIN, help="Saves a lot of VRAM for a modest speed cost.", ss_key="ss_gradient_checkpointing")
    xformers: str = setting(
        "sdpa", label="CrossAttention", tab=TAB, section=TRAIN, choices=("none", "sdpa", "xformers"),
        help="sdpa is PyTorch's fast attention and needs nothing extra; xformers only on NVIDIA GPUs with xformers installed.",
    )
    full_fp16: bool = setting(False, label="Full fp16 training (experimental)", tab=TAB, section=TRAIN, help="Also keeps the LoRA weights in fp16. Needs Mixed precision fp16.", ss_key="ss_full_fp16")
    full_bf16: bool = setting(False, label="Full bf16 training (experimental)", tab=TAB, section=TRAIN, help="Also keeps the LoRA weights in bf16. Needs Mixed precision bf16.")
    clip_skip: int = setting(1, label="Clip skip", tab=TAB, section=TRAIN, ge=0, le=12, step=1, widget="slider", help="2 for anime models based on NovelAI.", ss_key="ss_clip_skip", ss_none_if_off=True)
    max_token_length: int = setting(75, label="Max Token Length", tab=TAB, section=TRAIN, choices=(75, 150, 225), help="Longer captions are encoded in chunks of 75 tokens.", ss_key="ss_max_token_length")
    prior_loss_weight: float = setting(1.0, label="Prior loss weight", tab=TAB, section=TRAIN, ge=0, help="Loss weight of regularisation images.", ss_key="ss_prior_loss_weight")
    vae: str = setting("", label="VAE", tab=TAB, section=TRAIN, widget="file", help="Optional. A VAE .safetensors to use instead of the model's own.")
    dynamo_backend: str = setting(
        "no", label="Dynamo backend", tab=TAB, section=TRAIN, choices=("no", "inductor", "eager", "aot_eager", "cudagraphs"),
        help="torch.compile the UNet with this backend (first steps are slower while it compiles).",
    )
    min_timestep: int = setting(0, label="Min Timestep", tab=TAB, section=TRAIN, ge=0, le=1000, step=1, widget="slider")
    max_timestep: int = setting(1000, label="Max Timestep", tab=TAB, section=TRAIN, ge=0, le=1000, step=1, widget="slider")
    # --- Captions and augmentation ---------------------------------------------
    shuffle_caption: bool = setting(False, label="Shuffle caption", tab=TAB, section=CAPTION, help="Shuffle comma-separated tags each step (after Keep n tokens).", ss_key="ss_shuffle_caption")
    weighted_captions: bool = setting(
        False, label="Weighted captions", tab=TAB, section=CAPTION,
        help="Read (word:1.2), (word) and [word] in captions as weights on the text encoder's output for those "
             "tokens, as sd-scripts; off: the brackets are plain text.",
    )
    keep_tokens: int = setting(0, label="Keep n tokens", tab=TAB, section=CAPTION, ge=0, le=32, step=1, widget="slider", help="The first n tags stay in place when shuffling.", ss_key="ss_keep_tokens")
    caption_dropout_rate: float = setting(0, label="Rate of caption dropout", tab=TAB, section=CAPTION, ge=0, le=1, step=0.01, widget="slider", ss_key="ss_caption_dropout_rate")
    caption_dropout_every_n_epochs: int = setting(0, label="Dropout caption every n epochs", tab=TAB, section=CAPTION, ge=0, ss_key="ss_caption_dropout_every_n_epochs")
    caption_tag_dropout_rate: float = setting(0, label="Rate of tag dropout", tab=TAB, section=CAPTION, ge=0, le=1, step=0.01, widget="slider", help="Each tag after Keep n tokens is dropped with this probability (sd-scripts' caption_tag_dropout_rate).", ss_key="ss_caption_tag_dropout_rate")
    color_aug: bool = setting(False, label="Color augmentation", tab=TAB, section=CAPTION, help="Random hue/gamma changes. Turns latent caching off.", ss_key="ss_color_aug")
    flip_aug: bool = setting(False, label="Flip augmentation", tab=TAB, section=CAPTION, help="Random horizontal flips. Not for asymmetric subjects.", ss_key="ss_flip_aug")
    bucket_no_upscale: bool = setting(True, label="Don't upscale bucket resolution", tab=TAB, section=CAPTION, ss_key="ss_bucket_no_upscale")
    # sd-scripts takes any step (kohya_ss's slider stops at 128; its own test config t5clrs uses 256)
    bucket_reso_steps: int = setting(64, label="Bucket resolution steps", tab=TAB, section=CAPTION, ge=1, le=1024, step=1, widget="slider")
    random_crop: bool = setting(False, label="Random crop instead of center crop", tab=TAB, section=CAPTION, help="Turns latent caching off.", ss_key="ss_random_crop")
    # --- Noise -------------------------------------------------------------------
    noise_offset_type: str = setting("Original", label="Noise offset type", tab=TAB, section=NOISE, choices=("Original", "Multires"))
    noise_offset: float = setting(0, label="Noise offset", tab=TAB, section=NOISE, ge=0, le=1, step=0.01, widget="slider", help="0.05 to 0.15 helps very dark or bright images.", visible_when=ORIGINAL_NOISE, ss_key="ss_noise_offset", ss_none_if_off=True)
    noise_offset_random_strength: bool = setting(False, label="Noise offset random strength", tab=TAB, section=NOISE, visible_when=ORIGINAL_NOISE, ss_key="ss_noise_offset_random_strength")
    adaptive_noise_scale: float = setting(0, label="Adaptive noise scale", tab=TAB, section=NOISE, ge=-1, le=1, step=0.001, widget="slider", visible_when=ORIGINAL_NOISE, ss_key="ss_adaptive_noise_scale", ss_none_if_off=True)
    multires_noise_iterations: int = setting(0, label="Multires noise iterations", tab=TAB, section=NOISE, ge=0, le=64, step=1, widget="slider", help="6 to 10 recommended.", visible_when=MULTIRES_NOISE, ss_key="ss_multires_noise_iterations", ss_none_if_off=True)
    multires_noise_discount: float = setting(0.3, label="Multires noise discount", tab=TAB, section=NOISE, ge=0, le=1, step=0.01, widget="slider", visible_when=MULTIRES_NOISE, ss_key="ss_multires_noise_discount")
    ip_noise_gamma: float = setting(0, label="IP noise gamma", tab=TAB, section=NOISE, ge=0, le=1, step=0.01, widget="slider", ss_key="ss_ip_noise_gamma", ss_none_if_off=True)
    ip_noise_gamma_random_strength: bool = setting(
        False, label="IP noise gamma random strength", tab=TAB, section=NOISE, ss_key="ss_ip_noise_gamma_random_strength",
        help="Each step draws the input-perturbation strength between 0 and IP noise gamma.",
    )
    zero_terminal_snr: bool = setting(
        False, label="Zero terminal SNR", tab=TAB, section=NOISE, ss_key="ss_zero_terminal_snr",
        help="sd-scripts' --zero_terminal_snr: rescale the noise schedule so the last timestep is pure noise "
             "(for v-prediction models).",
    )
    # --- Loss ---------------------------------------------------------------------
    min_snr_gamma: float = setting(0, label="Min SNR gamma", tab=TAB, section=LOSS, ge=0, le=20, step=0.1, widget="slider", help="0 = off; 5 recommended.", ss_key="ss_min_snr_gamma", ss_none_if_off=True)
    loss_type: str = setting("l2", label="Loss type", tab=TAB, section=LOSS, choices=("huber", "smooth_l1", "l1", "l2"), ss_key="ss_loss_type")
    huber_schedule: str = setting("snr", label="Huber schedule", tab=TAB, section=LOSS, choices=("constant", "exponential", "snr"), visible_when=HUBER_LOSS, ss_key="ss_huber_schedule")
    huber_c: float = setting(0.1, label="Huber C", tab=TAB, section=LOSS, ge=0, le=1, visible_when=HUBER_LOSS, ss_key="ss_huber_c")
    huber_scale: float = setting(1.0, label="Huber scale", tab=TAB, section=LOSS, ge=0, le=10, visible_when=HUBER_LOSS, ss_key="ss_huber_scale")
    scale_v_pred_loss_like_noise_pred: bool = setting(False, label="Scale v prediction loss", tab=TAB, section=LOSS)
    debiased_estimation_loss: bool = setting(False, label="Debiased Estimation loss", tab=TAB, section=LOSS, ss_key="ss_debiased_estimation")
    masked_loss: bool = setting(
        False, label="Masked loss", tab=TAB, section=LOSS,
        help="Weight the loss by each image's alpha channel (transparent parts do not count), or by the mask of the "
             "same name in its subset's conditioning_data_dir (dataset config; black does not count), as sd-scripts.",
    )
    v_pred_like_loss: float = setting(0, label="V Pred like loss", tab=TAB, section=LOSS, ge=0, le=1, step=0.01,
                                      help="Add a v-prediction-like loss term with this weight (0 = off), as sd-scripts.")
    nan_loss_policy: str = setting(
        "stop", label="On NaN or infinite loss", tab=TAB, section=LOSS, choices=("stop", "skip"),
        help="stop: save what exists and stop with a hint. skip: drop that step and go on (stops after 10 in a row).",
    )
    # --- Saving and resume -----------------------------------------------------------
    save_every_n_steps: int = setting(0, label="Save every N steps", tab=TAB, section=SAVE, ge=0)
    save_last_n_steps: int = setting(0, label="Save last N steps", tab=TAB, section=SAVE, ge=0)
    save_last_n_epochs: int = setting(0, label="Save last N epochs", tab=TAB, section=SAVE, ge=0, help="0 = keep every epoch file.")
    save_last_n_epochs_state: int = setting(0, label="Save last N epochs state", tab=TAB, section=SAVE, ge=0)
    skip_cache_check: bool = setting(
        False, label="Skip cache check", tab=TAB, section=SAVE,
        help="Use latents cached on disk without checking that the image and the VAE are still the same (as "
             "sd-scripts' --skip_cache_check); off: a changed image or VAE is encoded again.",
    )
    save_last_n_steps_state: int = setting(
        0, label="Save last N steps state", tab=TAB, section=SAVE, ge=0,
        help="Keep only the step state folders of the last N steps (0 = follow Save last N steps), as sd-scripts.",
    )
    save_state: bool = setting(False, label="Save training state", tab=TAB, section=SAVE, help="Also save optimizer and RNG state with each file so a run can resume.")
    save_state_on_train_end: bool = setting(False, label="Save training state at end of training", tab=TAB, section=SAVE)
    resume: str = setting("", label="Resume from saved training state", tab=TAB, section=SAVE, widget="folder", help="A <name>-state folder written by Save training state.")
    # --- Data loading ---------------------------------------------------------------
    persistent_data_loader_workers: bool = setting(False, label="Persistent data loader", tab=TAB, section=DATA)
    max_data_loader_n_workers: int = setting(0, label="Max num workers for DataLoader", tab=TAB, section=DATA, ge=0, le=64)
    vae_batch_size: int = setting(0, label="VAE batch size", tab=TAB, section=DATA, ge=0, le=32, step=1, widget="slider", help="Images per VAE call when caching latents (0 = 1).")
    fp8_base: bool = setting(
        False, label="fp8 base training (experimental)", tab=TAB, section=TRAIN,
        help="NVIDIA GPUs with mixed precision: store the frozen UNet and text encoders in float8 (less VRAM).",
    )
    additional_parameters: str = setting(
        "", label="Additional parameters", tab=TAB, section=TRAIN, widget="textarea",
        help="sd-scripts flags as kohya_ss passes them, e.g. --max_grad_norm=0 --network_train_unet_only: each sets "
             "its Nekoya setting (the check lists them); a flag with no Nekoya setting is refused by name.",
    )
    log_prefix: str = setting("", label="Log prefix", tab=TAB, section=DATA,
                              help="Name of the TensorBoard run folder before its time stamp (empty: the output name).")
    bad_image_policy: str = setting(
        "stop", label="On unreadable image", tab=TAB, section=DATA, choices=("stop", "skip"),
        help="stop: stop the run naming the file. skip: leave the image out and go on.",
    )
    log_with: str = setting(
        "", label="Logging", tab=TAB, section=DATA, choices=("", "tensorboard", "wandb", "all"),
        help="Empty or tensorboard: TensorBoard logs in the Logging folder. wandb: Weights & Biases only (an offline "
             "run unless you ask for online; the logging extra installs it). all: both.",
    )
    wandb_run_name: str = setting("", label="WANDB run name", tab=TAB, section=DATA, visible_when=ONLY_WANDB,
                                  help="Empty = the output name.")
    log_tracker_name: str = setting("", label="Log tracker name", tab=TAB, section=DATA, visible_when=ONLY_WANDB,
                                    help="The W&B project (empty = network_train, as sd-scripts).")
    log_tracker_config: str = setting(
        "", label="Log tracker config", tab=TAB, section=DATA, widget="file", visible_when=ONLY_WANDB,
        help="Optional. A TOML file whose [wandb] table is passed to wandb.init (sd-scripts' --log_tracker_config).",
    )
    wandb_api_key: str = setting("", label="WANDB API Key", tab=TAB, section=DATA, visible_when=ONLY_WANDB,
                                 help="Only for an online W&B run; offline runs need none. Saved in the config file.")


class SampleSettings(BaseModel):
    sample_every_n_steps: int = setting(0, label="Sample every n steps", tab=SAMPLES, ge=0)
    sample_every_n_epochs: int = setting(0, label="Sample every n epochs", tab=SAMPLES, ge=0)
    sample_at_first: bool = setting(
        False, label="Sample at first", tab=SAMPLES,
        help="Also make the sample images before the first step: the base model's look, to compare with.",
    )
    sample_sampler: str = setting("euler_a", label="Sample sampler", tab=SAMPLES, choices=SAMPLERS)
    sample_prompts: str = setting(
        "", label="Sample prompts", tab=SAMPLES, widget="textarea",
        help="One prompt per line, with --n negative, --w width, --h height, --d seed, --l CFG scale, --s steps.",
    )
