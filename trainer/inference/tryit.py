"""Try it: a base model plus a LoRA at a weight, prompt in, images out; and side-by-side comparisons.

The base model stays loaded between calls (the same path is reused); LoRA files
are read once and kept while the base model stays. A LoRA is hooked in for one
generation with ``multiplier = weight`` and unhooked afterwards, so the next
call starts from the plain base model. Calls are serialised (one model, one GPU).
"""
from __future__ import annotations

import os
import random
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from trainer import device_lease
from trainer.inference.generate import ImageSpec, ProgressFn
from trainer.inference.prompts import round_size
from trainer.inference.requests import TryItRequest

FORM = TryItRequest()  # the defaults of the Try it form
DEFAULT_WEIGHT = FORM.weight
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class LoraChoice:
    path: str | None = None  # None or "": the base model alone
    weight: float = DEFAULT_WEIGHT

    @property
    def label(self) -> str:
        return "base model" if not self.path else f"{Path(self.path).stem} @ {self.weight:g}"


@dataclass(frozen=True)
class GenerateRequest:
    base_model: str
    prompt: str
    negative_prompt: str = ""
    lora: str | None = None
    weight: float = DEFAULT_WEIGHT
    width: int = FORM.width
    height: int = FORM.height
    steps: int = FORM.steps
    seed: int = FORM.seed  # -1: a random seed (reported in each image's info)
    cfg_scale: float = FORM.cfg_scale
    sampler: str = FORM.sampler
    count: int = FORM.count  # images, with seeds seed, seed+1, ...
    clip_skip: int = 1
    v_parameterization: bool | None = None  # None: as the model says
    # a model whose parts are separate files (kohya_ss's Flux fields): (setting, path) pairs, e.g. ("clip_l", ...)
    model_files: tuple[tuple[str, str], ...] = ()

    def with_lora(self, choice: LoraChoice) -> "GenerateRequest":
        return replace(self, lora=choice.path or None, weight=choice.weight)


class TryIt:
    def __init__(self, device: str | None = None, log: Callable[[str, str], None] | None = None) -> None:
        self.device = device
        self.log = log or (lambda message, level="info": None)
        self.model = None  # BaseModel
        self._loras: dict[tuple, object] = {}  # (path, mtime) -> AppliedLora, for the current model
        self._lock = threading.Lock()

    # -- public API --------------------------------------------------------------------------------------
    def generate(self, request: GenerateRequest, progress: ProgressFn | None = None) -> list[Image.Image]:
        """``request.count`` images; each image's ``info`` holds its ``seed`` and A1111-style ``parameters``."""
        return self.compare(request, [LoraChoice(request.lora, request.weight)], progress)[0]

    def compare(self, request: GenerateRequest, choices: Sequence[LoraChoice],
                progress: ProgressFn | None = None) -> list[list[Image.Image]]:
        """One image list per choice (LoRA file and weight, or none), all with the same seeds."""
        seed = request.seed if request.seed >= 0 else random.SystemRandom().randint(0, MAX_SEED)
        specs = [self._spec(request, seed + i) for i in range(max(1, request.count))]
        with self.hold_device(), self._lock:
            model = self._load(request.base_model, request.v_parameterization, request.model_files)
            steps = _Progress(progress, len(choices) * len(specs))
            return [self._with_lora(model, request, choice, specs, steps) for choice in choices]

    def load(self, base_model: str, v_parameterization: bool | None = None):
        """The loaded base model (``BaseModel``), loading it unless it is the one in the cache."""
        with self._lock:
            return self._load(base_model, v_parameterization)

    def hold_device(self, holder: str = device_lease.TRY_IT) -> device_lease.Lease:
        """This job's lease on the device; DeviceBusy while a training run holds it (both would not fit)."""
        from trainer.inference.base_model import inference_device_and_dtype

        device, _ = inference_device_and_dtype(self.device)
        return device_lease.take(device, holder)

    def unload(self) -> None:
        """Free the cached model and LoRAs (e.g. before training starts on the same GPU)."""
        with self._lock:
            self.model, self._loras = None, {}
            _free_device_memory()

    # -- internals ----------------------------------------------------------------------------------------
    def _load(self, base_model: str, v_parameterization: bool | None, model_files: tuple = ()):
        from trainer.inference.base_model import inference_device_and_dtype, load_base_model, model_key

        device, dtype = inference_device_and_dtype(self.device)
        key = model_key(base_model, v_parameterization, device, dtype, model_files)
        if self.model is None or self.model.key != key:
            self.model, self._loras = None, {}
            _free_device_memory()
            self.log(f"loading {base_model}", "info")
            self.model = load_base_model(base_model, v_parameterization, self.device, self.log, dict(model_files))
        return self.model

    def _with_lora(self, model, request: GenerateRequest, choice: LoraChoice, specs: list[ImageSpec],
                   steps: "_Progress") -> list[Image.Image]:
        from trainer.inference.generate import ImageGenerator

        generator = ImageGenerator(model.family, model.device, model.autocast, request.clip_skip, clip_sample=False)
        applied = self._lora(model, choice.path) if choice.path and choice.weight != 0 else None
        if applied is not None:
            applied.network.set_multiplier(float(choice.weight))
            applied.network.apply_to()
        try:
            images = []
            for spec in specs:
                image = generator.generate(spec, steps.callback())
                image.info["lora"] = choice.label
                images.append(image)
            return images
        finally:
            if applied is not None:
                applied.network.restore()

    def _lora(self, model, path: str):
        from trainer.inference.lora_apply import build_lora

        key = (os.path.abspath(path), os.stat(path).st_mtime_ns) if os.path.exists(path) else (path, 0)
        if key not in self._loras:
            applied = build_lora(path, model.family_key, model.family, model.device, model.dtype)
            for note in applied.notes():
                self.log(note, "warning")
            self._loras = {k: v for k, v in self._loras.items() if k[0] != key[0]}  # an older version of the file
            self._loras[key] = applied
        return self._loras[key]

    @staticmethod
    def _spec(request: GenerateRequest, seed: int) -> ImageSpec:
        return ImageSpec(request.prompt, request.negative_prompt, round_size(request.width),
                         round_size(request.height), max(1, int(request.steps)), float(request.cfg_scale),
                         seed % (MAX_SEED + 1), request.sampler)


class _Progress:
    """Per-image denoising progress turned into progress over the whole call."""

    def __init__(self, progress: ProgressFn | None, images: int) -> None:
        self.progress, self.images, self.done_images = progress, images, 0

    def callback(self) -> ProgressFn | None:
        if self.progress is None:
            return None
        index = self.done_images
        self.done_images += 1

        def report(done: int, total: int) -> None:
            self.progress(index * total + done, self.images * total)

        return report


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

