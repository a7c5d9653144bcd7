"""Text to image with a loaded model family: one denoising loop for SD1, SD2 (v or epsilon) and SDXL.

The family adapter does the model-specific parts exactly as in training
(``tokenize``/``encode_prompt`` for the conditioning, ``predict`` for the UNet
call with SDXL's pooled and size conditioning), so whatever the trainer learns
to condition on is what the samples see. Classifier-free guidance batches the
negative and the positive prompt; noise comes from a CPU generator so a seed
gives the same image on any device.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from trainer.families.clip_text import CHUNK
from trainer.inference.schedulers import make_scheduler

ProgressFn = Callable[[int, int], None]  # (denoising steps done, steps in all)
MAX_CHUNKS = 3  # prompts up to 225 tokens, as sd-scripts' samples and A1111


@dataclass(frozen=True)
class ImageSpec:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    scale: float = 7.5  # CFG; 1 or less: no guidance (no negative pass)
    seed: int = 0
    sampler: str = "euler_a"
    guidance: float | None = None  # embedded guidance of a guidance-distilled model (FLUX.1 dev); None: its default

    def parameters_text(self) -> str:
        """A1111-style generation parameters (PNG text chunk), so an image says how it was made."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(f"Steps: {self.steps}, Sampler: {self.sampler}, CFG scale: {self.scale}, Seed: {self.seed}, "
                     f"Size: {self.width}x{self.height}")
        return "\n".join(lines)


class _SizeConditioning:
    """What ``family.predict`` reads from a training batch: SDXL's (original, crop, target) sizes."""

    def __init__(self, batch: int, height: int, width: int) -> None:
        self.rows = [(height, width, 0, 0, height, width)] * batch

    def size_conditioning(self) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.long)


class ImageGenerator:
    """Generates images with a family's loaded components (and whatever LoRA is applied to them)."""

    def __init__(self, family: Any, device: torch.device, autocast: Callable[[], Any] = contextlib.nullcontext,
                 clip_skip: int = 0, clip_sample: bool = True) -> None:
        self.family, self.device, self.autocast = family, device, autocast
        self.clip_skip = int(clip_skip or 0)
        self.clip_sample = clip_sample

    def generate(self, spec: ImageSpec, progress: ProgressFn | None = None) -> Image.Image:
        with torch.no_grad():
            guided = spec.scale > 1.0
            cond = self.conditioning([spec.negative_prompt, spec.prompt] if guided else [spec.prompt])
            latents = self.denoise(spec, cond, guided, progress)
            image = self.decode(latents)
        image.info["parameters"] = spec.parameters_text()
        image.info["seed"] = spec.seed
        return image

    # -- the three stages ------------------------------------------------------------------------------
    def conditioning(self, prompts: list[str]) -> Any:
        """The UNet conditioning of the prompts, long prompts in as many 75-token chunks as needed."""
        family = self.family
        longest = max(len(family.tokenizer.tokenize(p)) for p in prompts)
        max_token_length = CHUNK * max(1, min(MAX_CHUNKS, math.ceil(longest / CHUNK)))
        with self.autocast():
            return family.encode_prompt(family.tokenize(prompts, max_token_length), self.clip_skip)

    def denoise(self, spec: ImageSpec, cond: Any, guided: bool, progress: ProgressFn | None) -> torch.Tensor:
        family, unet = self.family, self.family.unet
        own_sampler = getattr(family, "denoise", None)  # a family with its own formulation (flow matching)
        if own_sampler is not None:
            return own_sampler(spec, cond, progress, self.device, self.autocast)
        scheduler = make_scheduler(spec.sampler, family.v_prediction, self.clip_sample, family.spec.schedule)
        scheduler.set_timesteps(spec.steps, device=self.device)
        generator = torch.Generator("cpu").manual_seed(int(spec.seed))
        factor = self.vae_scale_factor
        shape = (1, unet.config.in_channels, spec.height // factor, spec.width // factor)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        latents = latents * scheduler.init_noise_sigma
        step_args = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        copies = 2 if guided else 1
        sizes = _SizeConditioning(copies, spec.height, spec.width)
        timesteps = scheduler.timesteps
        for index, t in enumerate(timesteps):
            model_input = scheduler.scale_model_input(torch.cat([latents] * copies), t)
            with self.autocast():
                pred = family.predict(model_input.to(unet.dtype), t, cond, sizes).float()
            if guided:
                uncond, text = pred.chunk(2)
                pred = uncond + spec.scale * (text - uncond)
            latents = scheduler.step(pred, t, latents, **step_args).prev_sample
            if progress is not None:
                progress(index + 1, len(timesteps))
        return latents

    def decode(self, latents: torch.Tensor) -> Image.Image:
        vae = self.family.vae
        pixels = self._vae_decode(latents)
        if vae.dtype != torch.float32 and not torch.isfinite(pixels).all():
            # a half VAE overflowed (SDXL's does without sdxl_no_half_vae): decode this one in fp32
            half = vae.dtype
            vae.to(dtype=torch.float32)
            try:
                pixels = self._vae_decode(latents)
            finally:
                vae.to(dtype=half)
        pixels = (pixels[0].float() / 2 + 0.5).clamp(0, 1)
        array = (pixels.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(array)

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.family.vae
        # outside autocast, so the VAE runs in its own dtype (fp32 when asked)
        with torch.autocast(vae.device.type, enabled=False):
            return vae.decode(self.family.unscale_latents(latents.to(vae.device, vae.dtype))).sample

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.family.vae.config.block_out_channels) - 1)
