"""kohya_ss config keys Nekoya reads but does not honour, one row each: what kohya_ss would do with
them, the values at which nothing is lost, and what Nekoya does instead.

Torch-free. The keys are kept and written back on save. ``trainer.preflight.ignored_settings`` warns for
every row of scope "sd" whose value is not an off value; rows of scope "other" (another model family's
keys) and "none" (keys that change no kohya_ss run, or that another row's warning covers) never warn.
The source of the keys and defaults is kohya_ss's LoRA tab (``kohya_gui/lora_gui.py``, its FIELD_REGISTRY).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Values at which a key does nothing, kohya_ss's GUI default first: an unticked checkbox, a number at 0, an empty
# text box (kohya_ss writes "" or false for one it leaves empty, and null keeps the form's value).
OFF: tuple = (False, 0, "", None)
NUMBER_OFF: tuple = (0, "", None, False)
TEXT_OFF: tuple = ("", None, False)

SD, OTHER, NONE = "sd", "other", "none"


@dataclass(frozen=True)
class KohyaKey:
    """One kohya_ss key Nekoya does not honour, and whether and when that loses anything."""

    key: str
    instead: str  # scope sd: what Nekoya does instead; other/none: why the key never matters here
    scope: str = SD  # "sd": would change an SD 1.x/2.x/SDXL run in kohya_ss; "other": another family's; "none"
    off: tuple = OFF  # values at which nothing is lost (the first is kohya_ss's default)
    fix: str = ""  # how to get kohya_ss's behaviour, where Nekoya has a way
    moot_when: tuple[tuple[str, tuple], ...] = ()  # (key, values): it does nothing while that key has one of them
    # a family's key ("other"): it warns all the same while this kohya checkbox setting is ticked (Flux.1's keys
    # that Nekoya does not apply to FLUX.1 runs yet)
    family_flag: str = ""

    def is_off(self, value: Any) -> bool:
        return same_value(value, self.off)

    def is_moot(self, values: dict[str, Any]) -> bool:
        """True when another setting makes this one do nothing (a Dynamo mode without a Dynamo backend)."""
        return any(same_value(values.get(other), moot_values) for other, moot_values in self.moot_when)


def same_value(value: Any, candidates: tuple) -> bool:
    """Whether ``value`` is one of ``candidates`` as kohya_ss reads JSON: "0" is 0, "False" is false, null is ""."""
    normal = _normal(value)
    return any(normal == _normal(c) for c in candidates)


def _normal(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (bool, int, float)):
        return float(value)
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return float(text == "true")
    try:
        return float(text)
    except ValueError:
        return text


def _sd(key: str, instead: str, **kw: Any) -> KohyaKey:
    return KohyaKey(key, instead, SD, **kw)


def _none(why: str, *keys: str) -> list[KohyaKey]:
    return [KohyaKey(k, why, NONE) for k in keys]


def _flux(instead: str, *keys: str) -> list[KohyaKey]:
    """kohya_ss's Flux.1 keys Nekoya does not apply yet: quiet for SD runs, a warning in FLUX.1 runs."""
    return [KohyaKey(k, instead, OTHER, family_flag="flux1_checkbox") for k in keys]


_NOT_FOR_FLUX_YET = "Nekoya does not apply it to FLUX.1 runs yet"


def _sd3(instead: str, *keys: str) -> list[KohyaKey]:
    """kohya_ss's SD3 keys Nekoya does not apply yet: quiet for other runs, a warning in SD3 runs."""
    return [KohyaKey(k, instead, OTHER, family_flag="sd3_checkbox") for k in keys]


_NOT_FOR_SD3_YET = "Nekoya does not apply it to SD3 runs yet"


def _family(family: str, *keys: str) -> list[KohyaKey]:
    return [KohyaKey(k, f"a {family} setting: kohya_ss uses it only when training {family}", OTHER) for k in keys]


_FAMILY_CHECKBOX = ("Nekoya trains SD 1.x, SD 2.x, SDXL, SD3 and FLUX.1 only: the run follows the v2, SDXL, SD3 and "
                    "Flux.1 checkboxes and the model file, not {}")
_NO_DYNAMO = (("dynamo_backend", ("no", "")),)
_SAME_RESULT = "(the trained LoRA is the same; only speed or memory use differ)"

ROWS: tuple[KohyaKey, ...] = (
    # --- Model and data -----------------------------------------------------------------------------
    _sd("train_inpainting", "the model is trained as a text-to-image model: the UNet gets no mask or masked image",
        fix="train inpainting LoRAs with kohya_ss"),
    *(_sd(key, _FAMILY_CHECKBOX.format(name)) for key, name in (
        ("hunyuan_image_checkbox", "HunyuanImage-2.1"),
        ("anima_checkbox", "Anima"), ("lumina_checkbox", "Lumina"))),
    # --- accelerate launch -------------------------------------------------------------------------
    _sd("dynamo_mode", "torch.compile runs in its default mode", off=("default", "", None),
        moot_when=_NO_DYNAMO),
    _sd("dynamo_use_fullgraph", "torch.compile may split the UNet into several graphs",
        moot_when=_NO_DYNAMO),
    _sd("dynamo_use_dynamic", "torch.compile decides itself whether shapes are dynamic",
        moot_when=_NO_DYNAMO),
    # --- Advanced ----------------------------------------------------------------------------------
    _sd("highvram", "Nekoya frees GPU memory as usual " + _SAME_RESULT),
    _sd("mem_eff_attn", "attention runs as CrossAttention says, not as sd-scripts' memory-efficient attention "
        + _SAME_RESULT, fix="choose CrossAttention sdpa or xformers to save memory"),
    _sd("log_config", "the training config is not logged to the tracker"),
    _sd("huggingface_repo_id", "the LoRA is not uploaded to Hugging Face: it is only written to the Output folder",
        off=TEXT_OFF, fix="upload the file yourself"),
    _sd("resume_from_huggingface", "training does not resume from Hugging Face",
        off=TEXT_OFF, fix="download the state folder and set Resume from saved training state to it"),
    *_none("the Hugging Face upload's detail, which huggingface_repo_id's warning covers",
           "huggingface_token", "huggingface_repo_type", "huggingface_repo_visibility", "huggingface_path_in_repo",
           "save_state_to_huggingface", "async_upload"),
    *_none("kohya_ss no longer passes it to sd-scripts", "lowvram"),
    *_none("kohya_ss does not apply it to LoRA either (it resets it to 0); the network check notes it",
           "stop_text_encoder_training"),
    *_none("Nekoya's data workers are threads: there are no worker processes to keep between epochs",
           "persistent_data_loader_workers"),
    # --- keys of other model families ---------------------------------------------------------------
    # FLUX.1 keys Nekoya does not apply yet (tab_flux.py declares the ones it applies): they warn in FLUX.1 runs
    *_flux(_NOT_FOR_FLUX_YET + " " + _SAME_RESULT, "mem_eff_save", "cpu_offload_checkpointing", "fp8_base_unet",
           "single_blocks_to_swap", "double_blocks_to_swap", "blocks_to_swap"),
    *_flux(_NOT_FOR_FLUX_YET + " (the LoRA file would differ)", "train_lora_ggpo"),
    *_family("Flux.1", "enable_all_linear", "ggpo_sigma", "ggpo_beta"),  # Flux1 OFT's; train_lora_ggpo's details
    *_none("kohya_ss does not pass it to sd-scripts (it sends train_blocks=single only with split_mode, which Nekoya "
           "applies the same way)", "train_blocks"),
    # SD3 keys Nekoya does not apply yet (tab_sd3.py declares the ones it applies): they warn in SD3 runs
    *(KohyaKey("sd3_cache_text_encoder_outputs_to_disk", "Nekoya does not cache text-encoder outputs on disk (sd-scripts "
               "also caches them in memory with it); the text encoders stay loaded and are trained unless Cache Text "
               "Encoder Outputs is ticked", OTHER, family_flag="sd3_checkbox",
               fix="tick Cache Text Encoder Outputs to cache them in memory"),),
    *_sd3(_NOT_FOR_SD3_YET + " " + _SAME_RESULT, "sd3_fused_backward_pass", "sd3_disable_mmap_load_safetensors",
          "sd3_text_encoder_batch_size"),
    *(KohyaKey(k, "sd-scripts' SD3 trainer does not apply it either (its help says [DOES NOT WORK])", OTHER)
      for k in ("save_clip", "save_t5xxl", "t5xxl_device", "t5xxl_dtype")),
    *_family("Flux.1, SD3, HunyuanImage, Anima or Lumina", "show_timesteps",
             "show_timesteps_resolution"),
    *_family("HunyuanImage-2.1", "hunyuan_image_cache_text_encoder_outputs",
             "hunyuan_image_cache_text_encoder_outputs_to_disk", "hunyuan_text_encoder", "hunyuan_byt5", "hunyuan_vae",
             "hunyuan_discrete_flow_shift", "hunyuan_model_prediction_type", "hunyuan_timestep_sampling",
             "hunyuan_sigmoid_scale", "hunyuan_attn_mode", "hunyuan_split_attn", "hunyuan_fp8_scaled",
             "hunyuan_fp8_vl", "hunyuan_text_encoder_cpu", "hunyuan_vae_chunk_size"),
    *_family("Anima", "anima_cache_text_encoder_outputs", "anima_cache_text_encoder_outputs_to_disk", "anima_qwen3",
             "anima_vae", "anima_llm_adapter_path", "anima_t5_tokenizer_path", "anima_discrete_flow_shift",
             "anima_timestep_sampling", "anima_sigmoid_scale", "anima_qwen3_max_token_length",
             "anima_t5_max_token_length", "anima_attn_mode", "anima_split_attn", "anima_vae_chunk_size",
             "anima_vae_disable_cache", "anima_unsloth_offload_checkpointing", "anima_qwen_image_vae_2d",
             "anima_compile", "anima_torch_compile", "anima_compile_backend", "anima_compile_mode",
             "anima_compile_dynamic", "anima_compile_fullgraph", "anima_compile_cache_size_limit"),
    *_family("Lumina", "lumina_cache_text_encoder_outputs", "lumina_cache_text_encoder_outputs_to_disk",
             "lumina_gemma2", "lumina_ae", "lumina_discrete_flow_shift", "lumina_model_prediction_type",
             "lumina_timestep_sampling", "lumina_sigmoid_scale", "lumina_gemma2_max_token_length",
             "lumina_system_prompt", "lumina_use_flash_attn", "lumina_use_sage_attn"),
    # --- keys older kohya_ss versions wrote, or its other tabs and helpers --------------------------
    *_none("renamed at load (to network_weights, stop_text_encoder_training, optimizer, log_with)",
           "lora_network_weights", "stop_text_encoder_training_pct", "use_8bit_adam", "use_wandb"),
    *_none("not a setting kohya_ss's LoRA tab reads (its dataset preparation, fine-tuning or file dialog fields)",
           "caption_metadata_filename", "latent_metadata_filename", "images_folder", "reg_images_folder",
           "instance_prompt", "class_prompt", "file_path", "save_as_bool", "no_token_padding",
           "cache_text_encoder_outputs"),
)

KOHYA_KEYS: dict[str, KohyaKey] = {row.key: row for row in ROWS}
KOHYA_UNUSED_KEYS = frozenset(KOHYA_KEYS)

# Keys of later kohya_ss versions not in the table yet: another family's, or a covered upload/tracker detail.
_FAMILY_PREFIXES = ("anima_", "hunyuan_", "lumina_", "flux1_", "sd3_")
_COVERED_PREFIXES = ("huggingface_", "wandb_")


def kohya_key(key: str) -> KohyaKey | None:
    """The row for ``key``, also for keys of a prefix the table covers; None for a key kohya_ss does not write."""
    row = KOHYA_KEYS.get(key)
    if row is None and key.startswith(_FAMILY_PREFIXES) and not _declared(key):  # flux1_* keys Nekoya applies
        row = KohyaKey(key, "a setting of another model family: kohya_ss uses it only when training that family",
                       OTHER)
    elif row is None and key.startswith(_COVERED_PREFIXES) and not _declared(key):
        row = KohyaKey(key, "a detail of the Hugging Face upload or wandb logging, which another warning covers", NONE)
    return row


def _declared(key: str) -> bool:
    from .model import is_setting  # late: the settings model's package imports this module

    return is_setting(key)


def is_kohya_unused(key: str) -> bool:
    return kohya_key(key) is not None
