"""FLUX.1 checks: the separate encoder/AE files kohya_ss's Flux fields name, the LoRA type, and the settings
sd-scripts' FLUX trainer reads differently. Only file headers are read; nothing is loaded."""
from __future__ import annotations

from pathlib import Path

from trainer.families.flux_files import T5_TOKENIZER_FIX, find_t5_tokenizer
from trainer.flux_lora_args import FluxLoraArgError, FluxLoraPlan, kohya_flux_args
from trainer.lora_types import FLUX_LORA, TYPES
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem

FLUX_FILES = {"clip_l": ("CLIP-L", "clip_l.safetensors", "embeddings.token_embedding.weight"),
              "t5xxl": ("T5-XXL", "t5xxl_fp16.safetensors", "shared.weight"),
              "ae": ("AE", "ae.safetensors", "decoder.conv_in.weight")}
# sd-scripts' FLUX trainer keeps the loss as it is (FluxNetworkTrainer.post_process_loss)
SD_LOSS_SETTINGS = {"min_snr_gamma": 0.0, "debiased_estimation_loss": False, "scale_v_pred_loss_like_noise_pred": False,
                    "v_pred_like_loss": 0.0}
# and it draws plain Gaussian noise (no offset or multires noise; ip_noise_gamma does apply)
SD_NOISE_SETTINGS = {"noise_offset": 0.0, "adaptive_noise_scale": 0.0}
MULTIRES_SETTINGS = {"multires_noise_iterations": 0}


def _flux(ctx: CheckContext) -> bool:
    return bool(getattr(ctx.settings, "flux1_checkbox", False))


@preflight_check("model.flux_files")
def check_flux_files(ctx: CheckContext):
    if not _flux(ctx) or ctx.model is None or ctx.model.info.format == "diffusers":
        return  # a diffusers FLUX folder holds every part; an empty field takes the folder's
    for key, (name, example, probe) in FLUX_FILES.items():
        value = str(getattr(ctx.settings, key) or "").strip()
        if not value:
            yield Problem("error", key, f"a FLUX transformer file needs the {name} file too, and {key} is empty",
                          fix=f"set {key} to your {example}")
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            yield Problem("error", key, f"{path} does not exist", fix=f"set {key} to your {example}", file=value)
            continue
        problem = _header_problem(path, probe, name)
        if problem:
            yield Problem("error", key, problem, fix=f"set {key} to your {example}", file=value)
        elif key == "t5xxl" and find_t5_tokenizer(path) is None:
            yield Problem("error", key, f"no T5 tokenizer for {path.name}: Nekoya never downloads it",
                          fix=T5_TOKENIZER_FIX, file=value)


def _header_problem(path: Path, probe: str, name: str) -> str:
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return ""
    from trainer.checkpoints.integrity import read_safetensors_header

    try:
        shapes = read_safetensors_header(path).shapes
    except Exception as exc:  # a damaged or foreign file: say which
        return f"{path.name} cannot be read as .safetensors ({exc})"
    if not any(k == probe or k.endswith("." + probe) or k == "text_model." + probe or
               k == "encoder.embed_tokens.weight" and probe == "shared.weight" for k in shapes):
        return f"{path.name} is not a {name} file (it has no {probe})"
    return ""


@preflight_check("network.flux_type")
def check_flux_lora_type(ctx: CheckContext):
    s = ctx.settings
    lora_type = TYPES.get(s.LoRA_type)
    flux_type = lora_type is not None and lora_type.network_module == FLUX_LORA
    lycoris = lora_type is not None and lora_type.lycoris  # kohya_ss lets LyCORIS types train FLUX.1 too
    if _flux(ctx) and not flux_type and not lycoris:
        yield Problem("error", "LoRA_type", f"LoRA type {s.LoRA_type!r} does not train FLUX.1 models (kohya_ss refuses it "
                      "with the Flux.1 checkbox)", fix="choose LoRA type Flux1 (or a LyCORIS type)")
    elif flux_type and not _flux(ctx):
        yield Problem("error", "LoRA_type", "LoRA type Flux1 trains FLUX.1 models only",
                      fix="tick Flux.1 and choose a FLUX.1 model, or choose LoRA type Standard")
    if flux_type:  # its network_args as sd-scripts' networks.lora_flux reads them (a value it refuses, by name)
        try:
            FluxLoraPlan.from_args(kohya_flux_args(s))
        except FluxLoraArgError as exc:
            yield Problem("error", exc.field, exc.what, fix=exc.fix)


@preflight_check("training.flux_settings")
def check_flux_settings(ctx: CheckContext):
    s = ctx.settings
    if not _flux(ctx):
        return
    if s.model_type != "flux":
        yield Problem("error", "model_type", f"Base Model Type {s.model_type!r} (Chroma) is not trained by Nekoya yet",
                      fix="choose flux, or train Chroma with kohya_ss")
    yield from _sd_only_settings(s)
    yield from _sizes(s)
    if s.weighted_captions:
        yield Problem("error", "weighted_captions", "Weighted captions are not supported for FLUX.1 (sd-scripts' FLUX "
                      "tokenizer has no weighted form either; its run stops)", fix="untick Weighted captions")
    if s.t5xxl_lr > 0 and not s.text_encoder_lr:
        yield Problem("error", "t5xxl_lr", "a T5XXL learning rate needs a Text Encoder learning rate above 0 (kohya_ss "
                      "refuses it otherwise)", fix="set Text Encoder learning rate, or set T5XXL learning rate to 0")
    elif s.t5xxl_lr > 0 and not s.train_t5xxl:
        yield Problem("note", "t5xxl_lr", "T5XXL learning rate has no effect without Train T5-XXL (no T5 LoRA)")
    if s.train_t5xxl and s.flux1_cache_text_encoder_outputs:
        yield Problem("error", "train_t5xxl", "Train T5-XXL needs the text encoders' outputs, which "
                      "Cache Text Encoder Outputs stores once", fix="untick one of the two")


def _sizes(s):
    """FLUX packs 2x2 latent patches: image sides must be multiples of 16; sd-scripts' FLUX trainer also wants the
    bucket step to be a multiple of 32 (verify_bucket_reso_steps(32))."""
    width, height = s.resolution
    if width % 16 or height % 16:
        yield Problem("error", "max_resolution", f"FLUX.1 needs image sides that are multiples of 16 "
                      f"({width}x{height} is not): its latents are packed in 2x2 patches",
                      fix=f"set max_resolution to {width // 16 * 16},{height // 16 * 16}")
    if s.enable_bucket and int(s.bucket_reso_steps) % 32:
        yield Problem("error", "bucket_reso_steps", f"sd-scripts' FLUX trainer needs a bucket resolution step that is "
                      f"a multiple of 32 (it is {s.bucket_reso_steps}; kohya_ss's run stops on it)",
                      fix="set bucket_reso_steps to 64")


def _sd_only_settings(s):
    """Settings sd-scripts' FLUX trainer does not use: off for the run (a note each), so it trains as kohya_ss's."""
    noise = MULTIRES_SETTINGS if s.noise_offset_type == "Multires" else SD_NOISE_SETTINGS
    for key, off in {**SD_LOSS_SETTINGS, **noise}.items():
        value = getattr(s, key)
        if value:
            what = "noise (it draws plain Gaussian noise)" if key in noise else "loss (it keeps the loss as it is)"
            yield Problem("note", key, f"{key} = {value} is not used for FLUX.1: sd-scripts' FLUX trainer does not "
                          f"apply it to its {what}, so it is off for this run, as in kohya_ss", changes=((key, off),))
