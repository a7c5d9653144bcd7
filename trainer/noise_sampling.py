"""Where a step's noise and timesteps come from: per-sample draws, or (tests) fixed ones.

Each sample draws from its own generator, seeded by its place in the step's whole batch (the batch's
``row_keys``): the draws do not depend on how many samples a process trains, so a run of two processes with
batch 1 each draws what one process with batch 2 draws, and a resumed run draws what the uninterrupted run
would. ``train(..., noise=FixedNoise)`` swaps the draw without a flag in the loop: an overfit test reuses one
draw per batch shape so its loss falls reliably. Never use it for real training.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from trainer.noise import NoiseConfig, randn_like, sample_noise, sample_timesteps


@dataclass(frozen=True)
class NoiseDraw:
    noise: torch.Tensor  # ε, what the model learns to remove (the target's input)
    timesteps: torch.Tensor
    input_noise: torch.Tensor  # what is added to the latents: ε, plus ip_noise_gamma's extra noise


class NoiseSampler(Protocol):
    def __call__(self, latents: torch.Tensor, row_keys: Sequence[str]) -> NoiseDraw: ...


# (noise settings, the family's noise schedule, the run's seed) -> the sampler a run uses
NoiseSamplerFactory = Callable[[NoiseConfig, Any, int], NoiseSampler]


def row_generator(key: str) -> torch.Generator:
    """A CPU generator seeded from a sample's row key (stable across processes and machines)."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(seed)


class RandomNoise:
    """Fresh noise and timesteps for every sample, from its row's generator."""

    def __init__(self, config: NoiseConfig, schedule: Any, seed: int) -> None:
        self.config, self.schedule, self.seed = config, schedule, seed

    def __call__(self, latents: torch.Tensor, row_keys: Sequence[str]) -> NoiseDraw:
        keys = list(row_keys) or [f"{self.seed}/row/{i}" for i in range(latents.shape[0])]
        rows = [self._row(latents[i:i + 1], row_generator(key)) for i, key in enumerate(keys)]
        noise, timesteps, input_noise = (torch.cat(parts) for parts in zip(*rows))
        return NoiseDraw(noise, timesteps, input_noise)

    def _row(self, latent: torch.Tensor, generator: torch.Generator):
        cfg, device = self.config, latent.device
        draw_timesteps = getattr(self.schedule, "sample_timesteps", None)  # a family's own distribution
        if draw_timesteps is not None:
            timesteps = draw_timesteps(1, cfg, generator, device, latent_hw=tuple(latent.shape[-2:]))
        else:
            timesteps = sample_timesteps(1, cfg.min_timestep, cfg.max_timestep, generator, device)
        noise = sample_noise(latent.detach().cpu(), cfg, generator).to(device=device, dtype=latent.dtype)
        return noise, timesteps, self._input_noise(noise, generator)

    def _input_noise(self, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """ip_noise_gamma: extra noise on the input only (its strength drawn up to gamma with random strength)."""
        cfg = self.config
        if not cfg.ip_noise_gamma:
            return noise
        strength = cfg.ip_noise_gamma
        if cfg.ip_noise_gamma_random_strength:
            strength = torch.rand(1, generator=generator).item() * strength
        return noise + strength * randn_like(noise, generator)


class FixedNoise:
    """Testing: one draw per batch shape, from the seed, reused every step."""

    def __init__(self, config: NoiseConfig, schedule: Any, seed: int) -> None:
        self.sampler, self.seed = RandomNoise(config, schedule, seed), seed
        self.draws: dict[tuple, NoiseDraw] = {}

    def __call__(self, latents: torch.Tensor, row_keys: Sequence[str]) -> NoiseDraw:
        key = tuple(latents.shape)
        if key not in self.draws:
            self.draws[key] = self.sampler(latents, [f"{self.seed}/fixed/{i}" for i in range(latents.shape[0])])
        return self.draws[key]
