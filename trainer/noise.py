"""Noise, timesteps and the forward diffusion, as SD trains: pure functions.

The schedule is the DDPM one every SD1/SD2/SDXL trainer uses (scaled_linear betas
0.00085..0.012 over 1000 steps). All randomness comes from the ``generator``
passed in, so a run (and a resumed run) is reproducible from its seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: torch.Tensor  # (T,) float32, on the training device
    v_prediction: bool = False  # the model predicts v instead of the noise ε

    @classmethod
    def scaled_linear(cls, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                      device: torch.device | str = "cpu", v_prediction: bool = False,
                      zero_terminal_snr: bool = False) -> "NoiseSchedule":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            alphas_cumprod = zero_terminal_snr_alphas_cumprod(alphas_cumprod)
        return cls(alphas_cumprod.to(device=device, dtype=torch.float32), v_prediction)

    @property
    def num_steps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod[timesteps].view(-1, *([1] * (like.dim() - 1)))
        return a.sqrt(), (1.0 - a).sqrt()

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε"""
        signal, sigma = self._coefficients(timesteps, latents)
        return (signal * latents.float() + sigma * noise.float()).to(latents.dtype)

    def velocity(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v-prediction target: v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x_0"""
        signal, sigma = self._coefficients(timesteps, latents)
        return (signal * noise.float() - sigma * latents.float()).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model learns to predict: v for v-prediction models, else the noise ε."""
        return self.velocity(latents, noise, timesteps) if self.v_prediction else noise

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1-ᾱ_t), the input of min-SNR and the other loss weightings."""
        a = self.alphas_cumprod[timesteps]
        return a / (1.0 - a)


def zero_terminal_snr_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (sd-scripts' --zero_terminal_snr): shift and scale sqrt(alphas_cumprod) so the last
    timestep has no signal left and the first keeps its value."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root**2


def sample_timesteps(batch: int, min_step: int, max_step: int, generator: torch.Generator, device) -> torch.Tensor:
    """Uniform integer timesteps in [min_step, max_step) per sample; min == max gives that step."""
    if max_step <= min_step:
        return torch.full((batch,), min_step, dtype=torch.long, device=device)
    return torch.randint(min_step, max_step, (batch,), generator=generator, device=generator.device).to(device)


def randn_like(x: torch.Tensor, generator: torch.Generator, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    out = torch.randn(shape or x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return out.to(device=x.device, dtype=x.dtype)


def offset_noise(noise: torch.Tensor, latents: torch.Tensor, offset: float, generator: torch.Generator,
                 random_strength: bool = False, adaptive_scale: float = 0.0) -> torch.Tensor:
    """sd-scripts' noise offset: a per-sample, per-channel constant added to the noise.

    ``random_strength`` draws the strength uniformly in [0, offset]; ``adaptive_scale``
    adds ``scale · |mean(latents)|`` per channel (clamped at 0).
    """
    strength: float | torch.Tensor = offset
    if random_strength:
        strength = torch.rand(1, generator=generator, device=generator.device).item() * offset
    if adaptive_scale:
        mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        strength = torch.clamp(strength + adaptive_scale * mean, min=0.0)
    shift = randn_like(noise, generator, shape=(noise.shape[0], noise.shape[1], 1, 1))
    return noise + (strength * shift).to(noise.dtype)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Multires noise: noise plus upsampled coarser noise at random scales, renormalised."""
    b, c, h, w = noise.shape
    out = noise.float().clone()
    for i in range(iterations):
        r = torch.rand(1, generator=generator, device=generator.device).item() * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        coarse = torch.randn((b, c, hn, wn), generator=generator, device=generator.device).to(noise.device)
        out += F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return (out / out.std()).to(noise.dtype)


@dataclass(frozen=True)
class NoiseConfig:
    offset: float = 0.0
    offset_random_strength: bool = False
    adaptive_scale: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int = 1000

    @classmethod
    def from_settings(cls, settings) -> "NoiseConfig":
        multires = settings.noise_offset_type == "Multires"
        return cls(
            offset=0.0 if multires else float(settings.noise_offset or 0.0),
            offset_random_strength=(not multires) and bool(settings.noise_offset_random_strength),
            adaptive_scale=0.0 if multires else float(settings.adaptive_noise_scale or 0.0),
            multires_iterations=int(settings.multires_noise_iterations or 0) if multires else 0,
            multires_discount=float(settings.multires_noise_discount),
            ip_noise_gamma=float(settings.ip_noise_gamma or 0.0),
            ip_noise_gamma_random_strength=bool(settings.ip_noise_gamma_random_strength),
            min_timestep=int(settings.min_timestep),
            max_timestep=int(settings.max_timestep),
        )


def sample_noise(latents: torch.Tensor, config: NoiseConfig, generator: torch.Generator) -> torch.Tensor:
    """The noise ε of one step, with offset / multires noise applied as configured."""
    noise = randn_like(latents, generator)
    if config.offset:
        noise = offset_noise(noise, latents, config.offset, generator, config.offset_random_strength, config.adaptive_scale)
    elif config.multires_iterations:
        noise = pyramid_noise(noise, config.multires_iterations, config.multires_discount, generator)
    return noise


def noisy_latents(schedule: NoiseSchedule, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  config: NoiseConfig, generator: torch.Generator) -> torch.Tensor:
    """x_t; with ip_noise_gamma the input gets extra noise while the target stays ε (at a strength drawn up to it
    each step with ip_noise_gamma_random_strength, as sd-scripts)."""
    if config.ip_noise_gamma:
        strength = config.ip_noise_gamma
        if config.ip_noise_gamma_random_strength:
            strength = torch.rand(1, generator=generator, device=generator.device).to(latents.device) * strength
        noise = noise + strength * randn_like(latents, generator)
    return schedule.add_noise(latents, noise, timesteps)
