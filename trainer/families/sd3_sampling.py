"""SD3 sample images: sd-scripts' ``sd3_train_utils.do_sample`` Euler loop with classifier-free guidance.

Sigmas are SAI's ``ModelSamplingDiscreteFlow(shift=3.0)`` at evenly spaced timesteps from 1000 down to 1, then 0;
each step moves x by (σ_next - σ)·v with v = uncond + scale·(cond - uncond) of the MMDiT's velocity output.
"""
from __future__ import annotations

from typing import Any

import torch

from trainer.families.flow_matching import shift_sigmas

SAMPLE_SHIFT = 3.0  # sd-scripts' sample_image_inference: ModelSamplingDiscreteFlow(shift=3.0)


def sd3_sigmas(steps: int, shift: float = SAMPLE_SHIFT, train_timesteps: int = 1000) -> list[float]:
    timesteps = torch.linspace(train_timesteps, 1, steps, dtype=torch.float64) / train_timesteps
    return shift_sigmas(timesteps, shift).tolist() + [0.0]


def euler_sample(family: Any, spec: Any, cond: Any, progress, device, autocast) -> torch.Tensor:
    guided = cond.pooled.shape[0] > 1  # the caller batched [negative, positive] for CFG
    factor = 2 ** (len(family.vae.config.block_out_channels) - 1)
    patch = family.unet.config.patch_size
    height, width = spec.height // factor // patch * patch, spec.width // factor // patch * patch
    generator = torch.Generator("cpu").manual_seed(int(spec.seed))
    channels = int(family.vae.config.latent_channels)
    latents = torch.randn((1, channels, height, width), generator=generator, dtype=torch.float32).to(device)
    sigmas = sd3_sigmas(spec.steps, train_timesteps=family.flow.num_train_timesteps)
    for index, (current, following) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        t = torch.tensor([current * family.flow.num_train_timesteps], device=device)
        model_input = torch.cat([latents] * 2) if guided else latents
        with autocast():
            velocity = family.transformer_output(model_input, t, cond).float()
        if guided:
            uncond, text = velocity.chunk(2)
            velocity = uncond + spec.scale * (text - uncond)
        latents = latents + (following - current) * velocity
        if progress is not None:
            progress(index + 1, len(sigmas) - 1)
    return latents
