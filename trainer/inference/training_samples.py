"""Sample images during training, as sd-scripts makes them.

When: every N epochs (which, when set, wins over every N steps, as in
sd-scripts), every N steps, before the first step (``sample_at_first``) and on a
Sample-now request between two steps. What: one image per prompt of
``sample_prompts``, with the model being trained and its current LoRA. Where:
``{output_dir}/sample/{output_name}_{e000003|000500}_{idx:02d}_{YYYYmmddHHMMSS}[_{seed}].png``.
A failed sample is a warning, never the end of the run.
"""
from __future__ import annotations

import contextlib

import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from trainer import events as ev
from trainer.inference.generate import ImageGenerator, ImageSpec
from trainer.inference.keep_state import training_state_kept
from trainer.inference.prompts import SamplePrompt, parse_sample_prompts
from trainer.inference.schedulers import canonical_sampler


def sample_file_name(output_name: str, step: int, epoch: int | None, index: int, seed: int | None,
                     when: float | None = None) -> str:
    """sd-scripts' name: ``e{epoch:06d}`` for epoch samples (0 before training), ``{step:06d}`` otherwise."""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(when))
    prefix = f"{output_name}_" if output_name else ""
    return f"{prefix}{number}_{index:02d}_{stamp}{'' if seed is None else f'_{seed}'}.png"


class TrainingSamples:
    def __init__(self, settings: Any, family: Any, network: torch.nn.Module, device: torch.device,
                 autocast: Callable[[], Any], sink: ev.EventSink) -> None:
        self.family, self.network, self.device, self.sink = family, network, device, sink
        self.output_name = settings.output_name
        self.folder = Path(settings.output_dir) / "sample"
        self.every_n_epochs = int(settings.sample_every_n_epochs or 0)
        self.every_n_steps = 0 if self.every_n_epochs else int(settings.sample_every_n_steps or 0)
        self.at_first = bool(settings.sample_at_first)
        self.generator = ImageGenerator(family, device, autocast, settings.clip_skip)
        self.default_sampler = self._sampler_or(settings.sample_sampler, "ddim")
        self.prompts = self._read_prompts(settings.sample_prompts)
        self._last_step = None  # the step last sampled after (no second set for the same step)
        self._told_no_prompts = False

    # -- when ------------------------------------------------------------------------------------------
    def before_training(self, step: int) -> None:
        if self.at_first:
            self.make(step, epoch=0, name_epoch=0)

    def after_step(self, step: int, epoch: int, requested: bool = False) -> None:
        due = bool(self.every_n_steps) and step % self.every_n_steps == 0
        if (due or requested) and step != self._last_step:
            self.make(step, epoch)

    def after_epoch(self, epoch: int, step: int, requested: bool = False) -> None:
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            self.make(step, epoch, name_epoch=epoch)
        elif requested and step != self._last_step:
            self.make(step, epoch)

    # -- what -------------------------------------------------------------------------------------------
    def make(self, step: int, epoch: int, name_epoch: int | None = None) -> list[Path]:
        """One image per prompt; a Sample event for each. Returns the files written."""
        self._last_step = step
        if not self.prompts:
            if not self._told_no_prompts:  # once: preflight already warns about sampling without prompts
                self._log("sample images were asked for, but Sample prompts is empty", "warning")
                self._told_no_prompts = True
            return []
        self._log(f"generating {len(self.prompts)} sample image(s) at step {step}")
        written = []
        try:
            eval_weights = getattr(self.network, "eval_weights", contextlib.nullcontext)
            with training_state_kept(self._eval_roots(), self._needed(), self.device), eval_weights():
                for prompt in self.prompts:
                    written.append(self._one(prompt, step, epoch, name_epoch))
        except Exception as exc:  # samples are a by-product: training goes on without them
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            self._log(f"sample images failed ({type(exc).__name__}: {exc}); training goes on", "warning")
        return written

    def _one(self, prompt: SamplePrompt, step: int, epoch: int, name_epoch: int | None) -> Path:
        from trainer.safety import atomic_write

        seed = prompt.seed if prompt.seed is not None else random.SystemRandom().randint(0, 2**31 - 1)
        spec = ImageSpec(prompt.prompt, prompt.negative_prompt, prompt.width, prompt.height, prompt.steps,
                         prompt.scale, seed, prompt.sampler or self.default_sampler, prompt.guidance)
        image = self.generator.generate(spec)
        path = self._free_path(sample_file_name(self.output_name, step, name_epoch, prompt.index, prompt.seed))
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=_png_text(image)))
        self.sink(ev.Sample(str(path), prompt.prompt, step, epoch))
        return path

    # -- helpers ----------------------------------------------------------------------------------------
    def _eval_roots(self) -> list[torch.nn.Module]:
        return [self.family.unet, *self.family.text_encoders, self.family.vae, self.network]

    def _needed(self) -> list[torch.nn.Module]:
        return [self.family.vae, *self.family.text_encoders]

    def _read_prompts(self, value: str) -> list[SamplePrompt]:
        try:
            prompts = parse_sample_prompts(value)
        except (OSError, ValueError, KeyError) as exc:  # unreadable or malformed prompt file
            self._log(f"sample prompts could not be read ({exc}); no samples", "warning")
            return []
        return [replace(p, sampler=self._sampler_or(p.sampler, self.default_sampler)) if p.sampler else p
                for p in prompts]

    def _sampler_or(self, name: str | None, fallback: str) -> str:
        try:
            return canonical_sampler(name or "")
        except ValueError:
            self._log(f"unknown sampler {name!r}; samples use {fallback}", "warning")
            return fallback

    def _free_path(self, name: str) -> Path:
        path = self.folder / name
        count = 1
        while path.exists():  # two sets within one second at the same step
            path = self.folder / f"{Path(name).stem}-{count}.png"
            count += 1
        return path

    def _log(self, message: str, level: str = "info") -> None:
        self.sink(ev.Log(message, level))


def _png_text(image):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", image.info.get("parameters", ""))
    return info
