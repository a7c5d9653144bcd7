"""Precision, caching and attention checks: settings that conflict, or that mean
something else on this device or model family. Each reports what the trainer
(``trainer.optim.rules``, the dataset) will actually do."""
from __future__ import annotations

import importlib.util

from trainer.families import SPECS, spec_for_settings
from trainer.preflight.families import checked_family
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem
from trainer.settings import setting_info

CAPTION_RANDOMNESS = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                      "caption_tag_dropout_rate")


def _family(ctx: CheckContext):
    return checked_family(ctx.settings, ctx.model.family if ctx.model is not None else None)


@preflight_check("training.precision")
def check_precision(ctx: CheckContext):
    s = ctx.settings
    choice = ctx.precision
    for note in choice.notes:
        yield Problem("note", note.field, note.message, fix=note.fix)
    if choice.mode != s.mixed_precision:
        return
    family = _family(ctx)
    if family.fp16_vae_overflows and s.mixed_precision == "fp16" and not s.sdxl_no_half_vae:
        yield Problem("warning", "sdxl_no_half_vae", f"the {family.label} VAE overflows in fp16 and produces NaN latents "
                      "(black images, NaN loss)", fix="tick No half VAE, or use Mixed precision bf16")


@preflight_check("training.latent_cache")
def check_latent_cache(ctx: CheckContext):
    s = ctx.settings
    augment = [label for key, label in (("color_aug", "Color augmentation"), ("random_crop", "Random crop")) if getattr(s, key)]
    if (s.cache_latents or s.cache_latents_to_disk) and augment:
        changes = tuple((key, False) for key in ("cache_latents", "cache_latents_to_disk") if getattr(s, key))
        verb = "changes" if len(augment) == 1 else "change"
        yield Problem("note", "cache_latents", f"{' and '.join(augment)} {verb} each image every epoch, so latents "
                      "cannot be cached: caching is turned off (steps are slower and use more memory)",
                      fix="untick " + " and ".join(augment) + " to cache latents", changes=changes)


@preflight_check("training.text_encoder_cache")
def check_text_encoder_cache(ctx: CheckContext):
    s = ctx.settings
    family = _family(ctx)
    cache_keys = {f.te_output_cache_setting for f in SPECS.values() if f.te_output_cache_setting}
    for key in cache_keys:
        if getattr(s, key) and key != family.te_output_cache_setting:
            yield Problem("note", key, f"only applies to other model families; ignored for {family.label}")
    key = family.te_output_cache_setting
    if not key or not getattr(s, key):
        return
    unet_lr, te_lr = s.train_lrs()
    if te_lr > 0 and unet_lr > 0:
        # the UNet keeps its rate; the text-encoder rate becomes 0 so metadata says what was trained
        yield Problem("note", key, "the text encoders are not trained when their outputs are cached "
                      "(the LoRA gets no text-encoder weights)", fix="untick it to train the text encoders",
                      changes=(("unet_lr", unet_lr), ("text_encoder_lr", 0.0)))
    elif te_lr > 0:
        yield Problem("error", key, "only the text encoders would be trained (Unet learning rate is 0), but their "
                      "outputs are cached, so nothing would learn", fix="set a Unet learning rate, or untick it")
    for field in CAPTION_RANDOMNESS:
        label = setting_info(field).label
        if getattr(s, field):
            yield Problem("warning", field, f"{label} has no effect: captions are encoded once when text-encoder "
                          "outputs are cached", fix=f"untick Cache text encoder outputs, or turn {label} off")


@preflight_check("training.attention")
def check_attention(ctx: CheckContext):
    if ctx.settings.xformers != "xformers":
        return
    if ctx.device.kind != "cuda":
        yield Problem("note", "xformers", "xformers works only on NVIDIA GPUs; PyTorch's sdpa attention is used instead")
    elif importlib.util.find_spec("xformers") is None:
        yield Problem("note", "xformers", "xformers is not installed; PyTorch's sdpa attention (as fast) is used instead",
                      fix="choose sdpa to silence this note")


@preflight_check("training.v_parameterization")
def check_v_parameterization(ctx: CheckContext):
    s = ctx.settings
    if ctx.model is not None and ctx.model.info.v_parameterization is not None:
        return  # the model's own answer is checked in model.family
    family = spec_for_settings(s)
    if s.v_parameterization and not family.v_prediction_models:
        yield Problem("warning", "v_parameterization", f"{family.label} models predict noise, not v; "
                      "v_parameterization is meant for SD 2.x 768 and v-prediction fine-tunes",
                      fix="untick v_parameterization unless your model is a v-prediction fine-tune")
