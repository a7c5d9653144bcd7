"""Where a step's noise and timesteps come from: fresh draws from the run's generator, or (tests) fixed ones.

``train(..., noise=fixed_noise)`` swaps the draw without a flag in the loop: an overfit test
reuses one draw per batch shape so its loss falls reliably. Never use it for real training.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from trainer.noise import NoiseConfig, sample_noise, sample_timesteps


class NoiseSampler(Protocol):
    def __call__(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


# (noise settings, the run's generator, the run's seed) -> the sampler a run uses
NoiseSamplerFactory = Callable[[NoiseConfig, torch.Generator, int], NoiseSampler]


class RandomNoise:
    """Every step draws its noise and timesteps from the run's generator (saved with the state, so a resumed
    run continues the same sequence)."""

    def __init__(self, config: NoiseConfig, generator: torch.Generator, seed: int) -> None:
        self.config, self.generator = config, generator

    def __call__(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        noise = sample_noise(latents, cfg, self.generator)
        return noise, sample_timesteps(latents.shape[0], cfg.min_timestep, cfg.max_timestep, self.generator,
                                       latents.device)


class FixedNoise:
    """Testing: one draw per batch shape, from the seed, reused every step."""

    def __init__(self, config: NoiseConfig, generator: torch.Generator, seed: int) -> None:
        self.config, self.seed = config, seed
        self.draws: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(latents.shape)
        if key not in self.draws:
            self.draws[key] = RandomNoise(self.config, torch.Generator(latents.device).manual_seed(self.seed), 0)(latents)
        return self.draws[key]
