"""Stable Diffusion 1.x and 2.x (epsilon or v-prediction): one CLIP text encoder, diffusers UNet."""
from __future__ import annotations

import os
from typing import Any

import torch

from trainer.families.base import LogFn
from trainer.families.clip_text import encode_chunks, tokenize_chunks
from trainer.families.spec import FamilySpec
from trainer.families.stable_diffusion import SD1, SD2
from trainer.network.metadata import VersionInfo
from trainer.network.targets import CLIP_CLASSES, UNET_ATTENTION_CLASSES, UNET_CONV_CLASSES, LoraTarget, Role
from trainer.noise import NoiseSchedule


class StableDiffusionFamily:
    spec: FamilySpec = SD1
    latent_scale = 0.18215
    latent_shift = 0.0
    cache_suffix = "sd"
    v2 = False

    def __init__(self, settings: Any) -> None:
        self.v_prediction = bool(settings.v_parameterization)
        self.zero_terminal_snr = bool(getattr(settings, "zero_terminal_snr", False))
        self.unet = self.vae = self.tokenizer = None
        self.text_encoders: tuple = ()
        self._fingerprint = ""

    @property
    def key(self) -> str:
        return self.spec.key

    # -- loading ------------------------------------------------------------------------
    def load(self, settings: Any, base_dtype: torch.dtype, device: torch.device, log: LogFn) -> None:
        from trainer.checkpoints import load_pipeline_components
        from trainer.checkpoints.load import load_vae

        parts = load_pipeline_components(
            settings.pretrained_model_name_or_path, family_hint=self.spec.layout, dtype=base_dtype,
            v_parameterization=self.v_prediction,
        )
        said = parts.info.v_parameterization
        if said is not None and said != self.v_prediction:
            log(self._prediction_mismatch(), "warning")
        self._take_components(parts)
        vae_dtype = self._vae_dtype(base_dtype)
        if settings.vae:
            self.vae = load_vae(settings.vae, parts.config_dir, vae_dtype)
        if self.vae.dtype != vae_dtype:  # fp32 VAE from half weights: the overflow is in activations, not weights
            self.vae.to(dtype=vae_dtype)
        for model in (self.unet, self.vae, *self.text_encoders):
            model.requires_grad_(False)
            model.eval()
            model.to(device)
        self._fingerprint = f"{_file_identity(settings.vae or settings.pretrained_model_name_or_path)}|{vae_dtype}"
        for message in self._setting_notes(settings):
            log(message, "warning")

    def _take_components(self, parts: Any) -> None:
        self.unet, self.vae, self.tokenizer = parts.unet, parts.vae, parts.tokenizer
        self.text_encoders = (parts.text_encoder,)

    def _vae_dtype(self, base_dtype: torch.dtype) -> torch.dtype:
        return base_dtype

    def _prediction_mismatch(self) -> str:
        wanted, found = ("v-prediction", "epsilon") if self.v_prediction else ("epsilon", "v-prediction")
        return (f"v_parameterization says {wanted} but the model's scheduler says {found}; training {wanted} "
                "as the settings say (tick or untick v_parameterization if that is wrong)")

    def _setting_notes(self, settings: Any) -> list[str]:
        """Warnings about settings this family reads differently."""
        return []

    def fingerprint(self) -> str:
        return self._fingerprint

    def lora_targets(self) -> list[LoraTarget]:
        return [
            # transformers 5 CLIP has no ``text_model`` module level; sd-scripts' keys carry it
            LoraTarget("lora_te", self.text_encoders[0], CLIP_CLASSES, Role.TEXT_ENCODER,
                       path_prefix="" if hasattr(self.text_encoders[0], "text_model") else "text_model."),
            LoraTarget("lora_unet", self.unet, UNET_ATTENTION_CLASSES, Role.UNET, UNET_CONV_CLASSES),
        ]

    def version_metadata(self) -> VersionInfo:
        base = "sd_v2" if self.v2 else "sd_v1"
        if self.v2:
            architecture = "stable-diffusion-v2-768-v" if self.v_prediction else "stable-diffusion-v2-512"
        else:
            architecture = "stable-diffusion-v1"
        return VersionInfo(
            base_model_version=base + ("_v" if self.v_prediction else ""),
            v2=self.v2,
            architecture=architecture,
            implementation="diffusers",
            prediction_type="v" if self.v_prediction else "epsilon",
        )

    # -- the diffusion formulation ------------------------------------------------------
    def noise_schedule(self, device: torch.device | str) -> NoiseSchedule:
        """DDPM with scaled_linear betas; the target is ε, or v as v_parameterization says."""
        betas = self.spec.schedule
        return NoiseSchedule.scaled_linear(betas.num_train_timesteps, betas.beta_start, betas.beta_end, device,
                                           v_prediction=self.v_prediction, zero_terminal_snr=self.zero_terminal_snr)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents as the UNet sees them."""
        return (latents - self.latent_shift) * self.latent_scale

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents back to what the VAE decodes."""
        return latents / self.latent_scale + self.latent_shift

    # -- text -----------------------------------------------------------------------------
    def tokenize(self, captions: list[str], max_token_length: int) -> torch.Tensor:
        return tokenize_chunks(self.tokenizer, captions, max_token_length)

    def encode_prompt(self, tokens: torch.Tensor, clip_skip: int) -> torch.Tensor:
        encoder = self.text_encoders[0]
        return encode_chunks(encoder, tokens.to(encoder.device), clip_skip)

    def tokenize_weighted(self, captions: list[str], max_token_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokenize``'s ids for captions with ``(word:1.2)`` weights, and the weight of each token."""
        from trainer.families.prompts import tokenize_weighted

        return tokenize_weighted(self.tokenizer, captions, max_token_length)

    def weight_prompt(self, cond: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from trainer.families.prompts import weight_hidden_states

        return weight_hidden_states(cond, weights)

    def select_prompt(self, cond: torch.Tensor, index: int) -> torch.Tensor:
        return cond[index]

    def stack_prompts(self, conds: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(conds)

    # -- images and the UNet ---------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor,
                      generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Unscaled latents sampled from the VAE's posterior. ``generator`` may be a list, one per image (the
        latent cache's per-image noise, so an image's latents do not depend on what it is encoded with)."""
        with torch.no_grad():
            dist = self.vae.encode(vae_input(self.vae, pixels)).latent_dist
            return dist.sample(generator=generator)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor, batch: Any) -> torch.Tensor:
        return self.unet(noisy, timesteps, encoder_hidden_states=cond)

    def set_attention(self, backend: str, log: LogFn) -> None:
        from trainer.models.attention import load_xformers, sdpa_attention

        attend = sdpa_attention
        if backend == "xformers":
            try:
                attend = load_xformers(self.unet.device, self.unet.dtype)
            except Exception as exc:  # not installed, or no CUDA kernel for this device/dtype
                log(f"xformers is not usable here ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                    "using PyTorch SDPA attention instead", "warning")
        elif backend == "none":
            log("CrossAttention 'none': using PyTorch SDPA attention, the standard attention of PyTorch 2", "info")
        self.unet.set_attention_backend(attend)

    def enable_gradient_checkpointing(self, text_encoders: bool) -> None:
        self.unet.enable_gradient_checkpointing()
        if text_encoders:
            for encoder in self.text_encoders:
                encoder.gradient_checkpointing_enable()
                encoder.train()  # checkpointing is on in train mode only (CLIP has no dropout)

    def release_vae(self) -> None:
        self.vae.to("cpu")

    def release_text_encoders(self) -> None:
        """Free the text encoders' device memory once every caption's outputs are cached."""
        for encoder in self.text_encoders:
            encoder.to("cpu")


class SD1Family(StableDiffusionFamily):
    spec = SD1
    v2 = False


class SD2Family(StableDiffusionFamily):
    spec = SD2
    v2 = True


def vae_input(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels for the VAE encoder, channels-last like its weights (about 15% faster convs, same results)."""
    if not getattr(vae, "_nekoya_channels_last", False):
        vae.to(memory_format=torch.channels_last)
        vae._nekoya_channels_last = True
    return pixels.to(vae.device, vae.dtype).contiguous(memory_format=torch.channels_last)


def _file_identity(path: str) -> str:
    try:
        stat = os.stat(path)
        return f"{os.path.abspath(path)}:{stat.st_mtime_ns}:{stat.st_size}"
    except OSError:
        return str(path)
