"""Rectified-flow noise as sd-scripts trains FLUX.1 (``library/flux_train_utils.py``), the family's noise schedule.

x_t = (1 - σ)·x_0 + σ·ε with σ = t / 1000; the model predicts the velocity ε - x_0. Timesteps are
floats in (0, 1000]: ``sample_timesteps`` draws them as sd-scripts' ``timestep_sampling`` says
(``get_noisy_model_input_and_timesteps``), and ``apply_prediction_type`` is its
``apply_model_prediction_type``. The settings come in at construction (``FlowConfig.from_settings``);
the sampler passes only the step's noise settings, whose min/max timestep FLUX does not use (as sd-scripts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
SD3_SAMPLING = "sd3"  # sd-scripts' SD3 draw (``sd3_train_utils.get_noisy_model_input_and_timesteps``), not a kohya choice
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")


@dataclass(frozen=True)
class FlowConfig:
    """sd-scripts' flags, at its defaults (``add_flux_train_arguments``, ``train_util`` for the weighting)."""

    timestep_sampling: str = "sigma"
    discrete_flow_shift: float = 3.0
    sigmoid_scale: float = 1.0
    model_prediction_type: str = "sigma_scaled"
    # kohya_ss passes these to SD3 runs only, so a FLUX run has sd-scripts' defaults (uniform)
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    image_tokens: int = 4096  # packed latent tokens for flux_shift: (H/16)*(W/16) of the training resolution
    training_shift: float = 1.0  # sd-scripts' SD3 --training_shift, applied to the density's u ("sd3" sampling)
    sample_target: bool = False  # SD3: the preconditioned prediction is x_0 and the target the latents

    @classmethod
    def from_settings(cls, settings: Any) -> "FlowConfig":
        width, height = settings.resolution
        return cls(
            timestep_sampling=settings.timestep_sampling, discrete_flow_shift=float(settings.discrete_flow_shift),
            sigmoid_scale=float(settings.sigmoid_scale), model_prediction_type=settings.model_prediction_type,
            image_tokens=max(1, (height // 16) * (width // 16)),
        )


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return (sigmas * shift) / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def flux_mu(image_tokens: int) -> float:
    """FLUX.1's resolution-dependent shift: 0.5 at 256 tokens, 1.15 at 4096, linear between."""
    slope = (1.15 - 0.5) / (4096 - 256)
    return slope * image_tokens + (0.5 - slope * 256)


def density_samples(config: FlowConfig, count: int, generator: torch.Generator) -> torch.Tensor:
    """u in [0, 1): sd-scripts' ``compute_density_for_timestep_sampling``."""
    if config.weighting_scheme == "logit_normal":
        u = torch.randn(count, generator=generator) * config.logit_std + config.logit_mean
        return torch.sigmoid(u)
    u = torch.rand(count, generator=generator)
    if config.weighting_scheme == "mode":
        return 1 - u - config.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """sd-scripts' ``compute_loss_weighting_for_sd3`` (applied with sigma_scaled predictions only)."""
    if weighting_scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


@dataclass(frozen=True)
class FlowMatchingSchedule:
    config: FlowConfig
    num_train_timesteps: int = 1000
    v_prediction: bool = False  # what the SD loss weightings ask; FLUX predicts a velocity of its own kind

    @property
    def num_steps(self) -> int:
        return self.num_train_timesteps

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.num_train_timesteps

    def _sigmas_like(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.sigmas(timesteps).to(like.device).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self._sigmas_like(timesteps, latents)
        return ((1.0 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """sd-scripts' FLUX target whatever the prediction type: ε - x_0 ("flow matching loss"); SD3's: x_0."""
        return latents if self.config.sample_target else noise - latents

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """((1-σ)/σ)², for the loss settings that read it; sd-scripts uses none of them for FLUX (a FLUX run turns
        them off: trainer/preflight/flux.py)."""
        sigma = self.sigmas(timesteps).clamp(min=1e-6)
        return ((1 - sigma) / sigma) ** 2

    def sample_timesteps(self, count: int, config: Any, generator: torch.Generator, device,
                         latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Float timesteps σ·1000 as ``timestep_sampling`` draws σ (``config``, the noise settings, is not used);
        ``latent_hw``: the sample's latent size, whose packed tokens flux_shift shifts by (as sd-scripts)."""
        c, n = self.config, self.num_train_timesteps
        if c.timestep_sampling == SD3_SAMPLING:
            return self.sd3_timesteps(count, config, generator, device)
        if c.timestep_sampling in ("uniform", "sigmoid"):
            sigmas = (torch.sigmoid(c.sigmoid_scale * torch.randn(count, generator=generator))
                      if c.timestep_sampling == "sigmoid" else torch.rand(count, generator=generator))
        elif c.timestep_sampling == "shift":
            sigmas = shift_sigmas(torch.sigmoid(torch.randn(count, generator=generator) * c.sigmoid_scale),
                                  c.discrete_flow_shift)
        elif c.timestep_sampling == "flux_shift":
            tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2) if latent_hw else c.image_tokens
            sigmas = time_shift(flux_mu(tokens), 1.0,
                                torch.sigmoid(torch.randn(count, generator=generator) * c.sigmoid_scale))
        else:  # "sigma": the FlowMatchEulerDiscreteScheduler's shifted table, indexed by the density's u
            indices = (density_samples(c, count, generator) * n).long().clamp(0, n - 1)
            sigmas = self.scheduler_sigmas()[indices]
        return (sigmas * n).to(device=device, dtype=torch.float32)

    def sd3_timesteps(self, count: int, config: Any, generator: torch.Generator, device) -> torch.Tensor:
        """SD3's integer timesteps: the density's u, shifted by training_shift, scaled into [min, max) timestep."""
        c = self.config
        u = density_samples(c, count, generator)
        u = (u * c.training_shift) / (1 + (c.training_shift - 1) * u)
        low = int(getattr(config, "min_timestep", 0) or 0)
        high = int(getattr(config, "max_timestep", self.num_train_timesteps) or self.num_train_timesteps)
        return (u * (high - low) + low).long().to(device=device, dtype=torch.float32)

    def scheduler_sigmas(self) -> torch.Tensor:
        """diffusers' FlowMatchEulerDiscreteScheduler(shift=discrete_flow_shift) training sigmas, 1 down to ~0."""
        n = self.num_train_timesteps
        t = torch.linspace(1, n, n, dtype=torch.float64).flip(0) / n
        return shift_sigmas(t, self.config.discrete_flow_shift).float()

    def apply_prediction_type(self, pred: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """sd-scripts' ``apply_model_prediction_type`` (its sigma_scaled loss weighting is ``prediction_weighting``)."""
        kind = self.config.model_prediction_type
        if kind == "additive":
            return pred + noisy
        if kind == "sigma_scaled":
            return pred * (-self._sigmas_like(timesteps, pred)) + noisy
        return pred

    def prediction_weighting(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights of sigma_scaled predictions; None when they are all one."""
        config = self.config
        if config.model_prediction_type != "sigma_scaled" or config.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        return loss_weighting(self.config.weighting_scheme, self.sigmas(timesteps))
