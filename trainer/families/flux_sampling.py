"""FLUX.1 sample images: BFL's Euler loop (``flux/sampling.py``'s ``get_schedule``/``denoise``, as sd-scripts'
``flux_train_utils.denoise``) with the model being trained.

dev shifts its schedule by the image size (mu 0.5 at 256 tokens to 1.15 at 4096) and is guided by its
guidance embedding (a prompt's ``--g``, else sd-scripts' sample default 3.5); schnell runs the plain linear
schedule. No classifier-free guidance pass (sd-scripts runs one only for a prompt's ``--l`` other than 1, its
FLUX default; Nekoya does not yet).
"""
from __future__ import annotations

from typing import Any

import torch

from trainer.families.flow_matching import flux_mu, time_shift

SAMPLE_GUIDANCE = 3.5  # sd-scripts' sample_image_inference: prompt_dict.get("guidance_scale", 3.5)


def flux_schedule(steps: int, image_tokens: int, shift: bool) -> list[float]:
    timesteps = torch.linspace(1, 0, steps + 1)
    if shift:
        timesteps = time_shift(flux_mu(image_tokens), 1.0, timesteps)
    return timesteps.tolist()


def euler_sample(family: Any, spec: Any, cond: Any, progress, device, autocast) -> torch.Tensor:
    if cond.pooled.shape[0] > 1:  # the caller batched a negative prompt: FLUX uses the positive one only
        cond = type(cond)(*(part[-1:] for part in cond))
    factor = 2 ** (len(family.vae.config.block_out_channels) - 1)
    height, width = spec.height // factor // 2 * 2, spec.width // factor // 2 * 2
    generator = torch.Generator("cpu").manual_seed(int(spec.seed))
    channels = int(family.vae.config.latent_channels)
    latents = torch.randn((1, channels, height, width), generator=generator, dtype=torch.float32).to(device)
    sigmas = flux_schedule(spec.steps, (height // 2) * (width // 2), shift=family.guidance_embed)
    guidance = SAMPLE_GUIDANCE if getattr(spec, "guidance", None) is None else float(spec.guidance)
    for index, (current, following) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        t = torch.tensor([current * family.flow.num_train_timesteps], device=device)
        with autocast():
            pred = family.transformer_output(latents, t, cond, guidance).float()
        latents = latents + (following - current) * pred
        if progress is not None:
            progress(index + 1, len(sigmas) - 1)
    return latents
