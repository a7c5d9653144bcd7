"""The interface every model family adapter implements.

The training loop only talks to a family through these methods, so SD1, SD2 and
later SDXL differ in their adapter classes and nowhere else.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol

import torch

from trainer.families.spec import FamilySpec
from trainer.network.metadata import VersionInfo
from trainer.network.targets import LoraTarget
from trainer.noise import NoiseSchedule

LogFn = Callable[[str, str], None]  # (message, level)


class ModelFamily(Protocol):
    spec: ClassVar[FamilySpec]  # the family's torch-free record
    key: str  # its registry key
    latent_scale: float  # VAE latents are shifted and multiplied by these before noising
    latent_shift: float
    cache_suffix: str  # latent cache file suffix ("sd", "sdxl")
    v_prediction: bool

    unet: torch.nn.Module
    text_encoders: tuple[torch.nn.Module, ...]

    def load(self, settings: Any, base_dtype: torch.dtype, device: torch.device, log: LogFn) -> None:
        """Load every component from ``settings.pretrained_model_name_or_path``, frozen, on ``device``."""

    def lora_targets(self) -> list[LoraTarget]:
        """The roots LoRA modules are attached to, with their key prefixes and target classes."""

    def version_metadata(self) -> VersionInfo:
        """ss_base_model_version / modelspec.architecture and friends."""

    def noise_schedule(self, device: torch.device | str) -> NoiseSchedule:
        """The forward diffusion, training target and SNR (loss-weighting input) of this model."""

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents as the denoiser sees them."""

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents back to what the VAE decodes."""

    def tokenize(self, captions: list[str], max_token_length: int) -> Any:
        """Token ids of the captions (whatever ``encode_prompt`` takes back)."""

    def encode_prompt(self, tokens: Any, clip_skip: int) -> Any:
        """UNet conditioning for a batch of tokenized captions."""

    def select_prompt(self, cond: Any, index: int) -> Any:
        """One sample's conditioning out of a batch (for the text-encoder output cache)."""

    def stack_prompts(self, conds: list[Any]) -> Any:
        """A batch of conditioning from per-sample pieces."""

    def encode_images(self, pixels: torch.Tensor,
                      generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Unscaled VAE latents (a sample of the latent distribution) of [-1, 1] pixels; a list of
        generators gives each row its own noise."""

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Any, batch: Any) -> torch.Tensor:
        """The UNet's prediction for noisy latents."""

    def set_attention(self, backend: str, log: LogFn) -> None:
        """"sdpa" (default), "xformers" (falls back to SDPA with a message) or "none"."""

    def enable_gradient_checkpointing(self, text_encoders: bool) -> None: ...

    def release_vae(self) -> None:
        """Free the VAE's device memory once latents are cached."""

    def release_text_encoders(self) -> None:
        """Free the text encoders' device memory once every caption's outputs are cached."""

    def fingerprint(self) -> str:
        """Identity of the VAE for the latent cache (a different VAE re-encodes)."""
