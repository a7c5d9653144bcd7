"""What Nekoya knows about a model family without loading it: one torch-free record per family.

The check, the GUI, the tools and the metadata read a family's label, kohya flags,
capabilities and memory figures from its ``FamilySpec``; only training, sampling and
the tools that open weights load the adapter class it names (``adapter_class()``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from trainer.families.tiny_models import TinySpec


@dataclass(frozen=True)
class DiffusionSchedule:
    """The forward-diffusion betas the family was trained with (diffusers' scheduler arguments)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def scheduler_arguments(self) -> dict[str, Any]:
        return {"num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "beta_schedule": self.beta_schedule}


@dataclass(frozen=True, eq=False)
class FamilySpec:
    key: str  # registry key, also what checkpoint detection reports
    label: str  # "Stable Diffusion 1.x": check messages
    short_label: str  # "SD 1.x": model pick notes, tools
    adapter: str  # "module:Class" of the adapter that loads and trains the model
    # kohya_ss's model checkboxes this family sets when picked, and which of them select it
    flags: Mapping[str, bool]
    selecting_flags: tuple[str, ...]
    # memory figures (trainer/families/stable_diffusion.py says where they come from)
    unet_params: int
    text_encoder_params: tuple[int, ...]
    vae_params: int
    unet_lora_per_rank: int  # sum of (in + out) over the UNet's linear targets
    unet_conv_per_rank: int  # sum of (in * 9 + out) over the 3x3 conv targets (LoCon)
    text_encoder_lora_per_rank: int  # all text encoders together
    activations_gib: float  # per 512x512 sample, half precision, no gradient checkpointing
    checkpointed_activations_gib: float  # the same with gradient checkpointing
    native_resolution: int
    conditioning_width: int  # text conditioning channels (the UNet's cross-attention input); LoRAs tell it
    # capabilities
    sgm_lora_names: bool = False  # its LoRAs name UNet modules in the original (SGM) layout, as sd-scripts
    lora_key_markers: tuple[str, ...] = ()  # key prefixes only this family's LoRAs carry ("lora_unet_double_blocks_")
    # settings naming its text encoders' and VAE's own files when the base model file holds the denoiser alone
    # (FLUX.1's clip_l, t5xxl, ae): the memory estimate counts their headers
    text_encoder_file_settings: tuple[str, ...] = ()
    vae_file_setting: str = ""
    v_prediction_models: bool = True  # v-prediction checkpoints of this family exist
    files_tell_prediction: bool = True  # a single file without metadata still says epsilon or v (not SD2's)
    te_output_cache_setting: str | None = None  # the setting that caches text-encoder outputs, if any
    fp16_vae_overflows: bool = False  # the VAE gives NaN in fp16 (needs the no-half-VAE setting)
    schedule: DiffusionSchedule = field(default_factory=DiffusionSchedule)
    # the checkpoint layout it loads, as trainer.checkpoints.detect reports it; None: its own key
    checkpoint_layout: str | None = None
    # the tiny random model trainer.devtools builds for tests under this key (None: none), and other
    # models of the family it builds under their own names (an SD2 v-prediction variant)
    tiny: TinySpec | None = None
    tiny_variants: Mapping[str, TinySpec] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.key

    @property
    def layout(self) -> str:
        return self.checkpoint_layout or self.key

    def display_name(self, v_prediction: bool = False) -> str:
        return self.short_label + (" v-prediction" if v_prediction else "")

    def selected_by(self, flags: Mapping[str, Any]) -> bool:
        """Whether kohya's checkboxes (a settings object's values by name) choose this family."""
        return all(bool(flags.get(name)) == self.flags[name] for name in self.selecting_flags)

    def adapter_class(self) -> type:
        module, _, name = self.adapter.partition(":")
        return getattr(importlib.import_module(module), name)
