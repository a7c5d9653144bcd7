"""SD 3 / 3.5 checks: the text encoders a SAI file lacks (kohya_ss's SD3 fields name them), the LoRA type, and the
settings sd-scripts' SD3 trainer reads differently. Only file headers are read; nothing is loaded."""
from __future__ import annotations

from pathlib import Path

from trainer.families.flux_files import (T5_HUB_ID, T5_TOKENIZER_FIX, TOKENIZER_SIDECAR, find_t5_tokenizer,
                                         has_tokenizer_files, hub_cache)
from trainer.lora_types import KOHYA_LORA, TYPES
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem

# setting -> (name, example file, a key the file has, the prefix a SAI file keeps this encoder under)
SD3_ENCODERS = {
    "sd3_clip_l": ("CLIP-L", "clip_l.safetensors", "text_model.embeddings.token_embedding.weight",
                   "text_encoders.clip_l.transformer."),
    "clip_g": ("CLIP-G", "clip_g.safetensors", "text_model.embeddings.token_embedding.weight",
               "text_encoders.clip_g.transformer."),
    "sd3_t5xxl": ("T5-XXL", "t5xxl_fp16.safetensors", "shared.weight", "text_encoders.t5xxl.transformer."),
}
# sd-scripts' SD3 trainer keeps the loss as it is (Sd3NetworkTrainer.post_process_loss) and draws plain noise
SD_LOSS_SETTINGS = {"min_snr_gamma": 0.0, "debiased_estimation_loss": False, "scale_v_pred_loss_like_noise_pred": False,
                    "v_pred_like_loss": 0.0}
SD_NOISE_SETTINGS = {"noise_offset": 0.0, "adaptive_noise_scale": 0.0}
MULTIRES_SETTINGS = {"multires_noise_iterations": 0}
IP_NOISE_SETTINGS = {"ip_noise_gamma": 0.0}  # FLUX's trainer applies it; SD3's get_noisy_model_input... does not


def _sd3(ctx: CheckContext) -> bool:
    return bool(getattr(ctx.settings, "sd3_checkbox", False))


@preflight_check("model.sd3_encoders")
def check_sd3_encoders(ctx: CheckContext):
    if not _sd3(ctx) or ctx.model is None or ctx.model.info.format == "diffusers":
        return  # a diffusers SD3 folder holds every encoder; a set field replaces the folder's
    model = Path(ctx.model.info.path)
    own = _header_keys(model)
    for key, (name, example, probe, prefix) in SD3_ENCODERS.items():
        value = str(getattr(ctx.settings, key) or "").strip()
        if not value:
            if own is not None and not any(k.startswith(prefix) for k in own):
                yield Problem("error", key, f"the model file has no {name} text encoder ({prefix}*) and {key} is "
                              "empty", fix=f"set {key} to your {example}", file=str(model))
            elif key == "sd3_t5xxl" and _embedded_t5_tokenizer(model) is None:
                yield Problem("error", key, f"no T5 tokenizer for {model.name}'s T5-XXL: Nekoya never downloads it",
                              fix=f"put T5's tokenizer files in {model.name}{TOKENIZER_SIDECAR}/t5xxl/, or have "
                              f"{T5_HUB_ID} in the local Hugging Face cache", file=str(model))
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            yield Problem("error", key, f"{path} does not exist", fix=f"set {key} to your {example}", file=value)
            continue
        keys = _header_keys(path)
        if keys is not None and not any(k == probe or k.endswith("." + probe) or
                                        probe == "shared.weight" and k.endswith("embed_tokens.weight") for k in keys):
            yield Problem("error", key, f"{path.name} is not a {name} file (it has no {probe})",
                          fix=f"set {key} to your {example}", file=value)
        elif key == "sd3_t5xxl" and find_t5_tokenizer(path) is None:
            yield Problem("error", key, f"no T5 tokenizer for {path.name}: Nekoya never downloads it",
                          fix=T5_TOKENIZER_FIX, file=value)


def _embedded_t5_tokenizer(model: Path) -> Path | None:
    """Where the T5 tokenizer of a SAI file's own T5-XXL loads from (trainer.families.sd3_load's order)."""
    sidecar = Path(str(model) + TOKENIZER_SIDECAR)
    for folder in (sidecar / "t5xxl", sidecar):
        if has_tokenizer_files(folder):
            return folder
    cached = hub_cache(T5_HUB_ID)
    return cached if cached is not None and has_tokenizer_files(cached) else None


def _header_keys(path: Path) -> list[str] | None:
    """The tensor names of a .safetensors file; None for other files or an unreadable one (other checks say)."""
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return None
    from trainer.checkpoints.integrity import read_safetensors_header

    try:
        return list(read_safetensors_header(path).shapes)
    except Exception:  # a damaged file: the model checks name it
        return None


@preflight_check("model.sd3_with_other_family")
def check_sd3_alone(ctx: CheckContext):
    """kohya_ss makes its model checkboxes exclusive; a config with SD3 and another family's box ticked is ambiguous."""
    from trainer.families import SPECS, spec_for_settings

    s = ctx.settings
    if not _sd3(ctx):
        return
    chosen = spec_for_settings(s)
    for spec in SPECS.values():
        for key in spec.selecting_flags:
            if spec.flags[key] and key not in chosen.selecting_flags and getattr(s, key, False):
                yield Problem("error", key, f"{chosen.short_label} and {spec.short_label} ({key}) are both ticked; a "
                              "model is one or the other", fix=f"untick {key} (or untick sd3_checkbox for a "
                              f"{spec.short_label} model)")


@preflight_check("network.sd3_type")
def check_sd3_lora_type(ctx: CheckContext):
    s = ctx.settings
    lora_type = TYPES.get(s.LoRA_type)
    if _sd3(ctx) and lora_type is not None and lora_type.network_module != KOHYA_LORA:
        yield Problem("error", "LoRA_type", f"LoRA type {s.LoRA_type!r} does not train SD3 models in Nekoya (kohya_ss "
                      "runs sd-scripts' networks.lora_sd3 for Standard)", fix="choose LoRA type Standard")


@preflight_check("training.sd3_settings")
def check_sd3_settings(ctx: CheckContext):
    s = ctx.settings
    if not _sd3(ctx):
        return
    yield from _sd_only_settings(s)
    yield from _block_settings(s)
    swap = int(s.kept_kohya_values().get("blocks_to_swap", 0) or 0)  # kohya_ss passes it to SD3 runs too
    if swap:  # (its row in kohya_unused warns in FLUX's)
        yield Problem("warning", "blocks_to_swap", f"blocks_to_swap = {swap} is not applied to SD3 runs "
                      "yet: every joint block stays on the GPU (the LoRA is the same; only memory use differs)",
                      fix="set blocks_to_swap to 0, or use gradient checkpointing and fp8_base to save memory")
    yield from _sizes(s)
    if s.weighted_captions:
        yield Problem("error", "weighted_captions", "Weighted captions are not supported for SD3 (sd-scripts' SD3 "
                      "tokenizer has no weighted form either; its run stops)", fix="untick Weighted captions")


def _sd_only_settings(s):
    """Settings sd-scripts' SD3 trainer does not use (its post_process_loss keeps the loss, its noise is plain
    Gaussian): off for the run, a note each, so it trains as kohya_ss's."""
    noise = {**(MULTIRES_SETTINGS if s.noise_offset_type == "Multires" else SD_NOISE_SETTINGS), **IP_NOISE_SETTINGS}
    for key, off in {**SD_LOSS_SETTINGS, **noise}.items():
        value = getattr(s, key)
        if value:
            what = "noise (it draws plain Gaussian noise)" if key in noise else "loss (it keeps the loss as it is)"
            yield Problem("note", key, f"{key} = {value} is not used for SD3: sd-scripts' SD3 trainer does not apply "
                          f"it to its {what}, so it is off for this run, as in kohya_ss", changes=((key, off),))


def _block_settings(s):
    """sd-scripts' networks.lora_sd3 reads no block settings (its blocks are joint blocks, not SD's UNet blocks):
    off for the run, a note each, so the LoRA is kohya_ss's."""
    from trainer.lora_blocks import BLOCK_KEYS

    for key in BLOCK_KEYS:
        value = str(getattr(s, key) or "").strip()
        if value:
            yield Problem("note", key, f"{key} = {value!r} is not used for SD3: sd-scripts' networks.lora_sd3 does not "
                          "read block settings, so it is off for this run, as in kohya_ss", changes=((key, ""),))


def _sizes(s):
    """The MMDiT takes 2x2 patches of 8x-downsampled latents: sides must be multiples of 16; sd-scripts' SD3
    trainer wants the bucket step to be a multiple of 32 (verify_bucket_reso_steps(32))."""
    width, height = s.resolution
    if width % 16 or height % 16:
        yield Problem("error", "max_resolution", f"SD3 needs image sides that are multiples of 16 ({width}x{height} "
                      "is not): its latents are cut into 2x2 patches", fix=f"set max_resolution to "
                      f"{width // 16 * 16},{height // 16 * 16}")
    if s.enable_bucket and int(s.bucket_reso_steps) % 32:
        yield Problem("error", "bucket_reso_steps", f"sd-scripts' SD3 trainer needs a bucket resolution step that is "
                      f"a multiple of 32 (it is {s.bucket_reso_steps}; kohya_ss's run stops on it)",
                      fix="set bucket_reso_steps to 64")
