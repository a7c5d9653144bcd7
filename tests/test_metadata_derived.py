"""The ``ss_*`` metadata of a run: keys that pass a setting through come from the settings
declaration (``ss_key=``) and stay exactly what the hand-written map wrote."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.network.metadata import DatasetFacts, VersionInfo, training_metadata
from trainer.settings import setting_infos, settings_from_dict

GOLDEN = Path(__file__).resolve().parent / "data" / "training_metadata_golden.json"
VERSION = VersionInfo("sd_v1", False, "stable-diffusion-v1", "https://github.com/Stability-AI/generative-models",
                      "epsilon")
DATA = DatasetFacts(num_train_images=40, num_reg_images=10, num_batches_per_epoch=25,
                    dataset_dirs={"10_dog": {"n_repeats": 10, "img_count": 4}}, tag_frequency={"10_dog": {"dog": 4}},
                    bucket_info={"buckets": {"0": {"resolution": [512, 512], "count": 4}}, "mean_img_ar_error": 0.0})
RUN = {"session_id": 123, "started_at": 1700000000.5, "num_epochs": 3, "max_train_steps": 75, "lr_warmup_steps": 7,
       "optimizer": "torch.optim.adamw.AdamW(weight_decay=0.01)", "unet_lr": 0.0002, "text_encoder_lr": 5e-05,
       "network_args": {"conv_dim": "4"}, "model_hashes": {"ss_sd_model_name": "base.safetensors"}}
# Every setting the metadata passes through set away from its default (and from each other), so a
# key mapped to the wrong setting or losing its "0 is None" rule changes a value.
VARIED = {
    "output_name": "golden", "learning_rate": 3e-4, "gradient_checkpointing": True, "gradient_accumulation_steps": 3,
    "lr_scheduler": "linear", "network_dim": 12, "network_alpha": 6, "network_dropout": 0.1, "mixed_precision": "bf16",
    "clip_skip": 2, "max_token_length": 150, "cache_latents": False, "cache_latents_to_disk": False, "full_fp16": True, "seed": 1234, "noise_offset": 0.05,
    "multires_noise_iterations": 6, "multires_noise_discount": 0.4, "adaptive_noise_scale": 0.01,
    "training_comment": "hello", "max_grad_norm": 0.5, "caption_dropout_rate": 0.05,
    "caption_dropout_every_n_epochs": 2, "prior_loss_weight": 0.7, "min_snr_gamma": 5, "scale_weight_norms": 1.5,
    "ip_noise_gamma": 0.1, "debiased_estimation_loss": True, "noise_offset_random_strength": True,
    "loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.2, "huber_scale": 1.5, "train_batch_size": 2,
    "max_resolution": "768,640", "color_aug": True, "flip_aug": True, "random_crop": True, "shuffle_caption": True,
    "keep_tokens": 1, "enable_bucket": False, "bucket_no_upscale": False, "min_bucket_reso": 320,
    "max_bucket_reso": 1536,
}


def _metadata(values: dict) -> dict[str, str]:
    settings = settings_from_dict(values).settings
    # the precision that ran is the one asked for, as on a GPU (a CPU may run fp32: test_run_plan)
    return training_metadata(settings, VERSION, DATA, {**RUN, "mixed_precision": settings.mixed_precision})


def test_metadata_keys_and_values_are_those_the_hand_written_map_wrote():
    # the golden file was written by the hand-written map before the keys came from the declaration
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert _metadata({}) == golden["defaults"]
    assert _metadata(VARIED) == golden["varied"]


def test_pass_through_keys_come_from_the_settings_declaration():
    infos = [info for info in setting_infos() if info.ss_key]
    assert {i.ss_key: i.key for i in infos}["ss_batch_size_per_device"] == "train_batch_size" and len(infos) >= 40
    settings, meta = settings_from_dict(VARIED).settings, _metadata(VARIED)
    for info in infos:
        value = getattr(settings, info.key)
        assert meta[info.ss_key] == str(value or None if info.ss_none_if_off else value), info.ss_key


def test_caption_tag_dropout_rate_is_recorded_as_set():
    assert _metadata({"caption_tag_dropout_rate": 0.3})["ss_caption_tag_dropout_rate"] == "0.3"
