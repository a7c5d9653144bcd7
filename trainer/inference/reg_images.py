"""Regularisation (class) images: generate the missing ones from the base model before training.

As the A1111 DreamBooth extension's "Total Number of Class/Reg Images": when the
reg folder holds fewer images than asked for, the difference is generated with
the class prompt. Images already there are kept and counted; new files never
overwrite anything. Seeds are ``seed, seed+1, ...`` so a run can be repeated.
"""
from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

from trainer.device_lease import REG_IMAGES
from trainer.inference.requests import RegImagesRequest
from trainer.inference.tryit import MAX_SEED, GenerateRequest, TryIt

FORM = RegImagesRequest()  # the defaults of the regularisation images form

RegProgress = Callable[[int, int], None]  # (images done, images to make)


def existing_images(folder) -> list[Path]:
    from trainer.data.folders import is_image_file

    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def generate_reg_images(base_model: str, reg_folder, class_prompt: str, count: int,
                        size: tuple[int, int] = (FORM.width, FORM.height), *, negative_prompt: str = "",
                        steps: int = FORM.steps, cfg_scale: float = FORM.cfg_scale, sampler: str = FORM.sampler,
                        seed: int = -1, clip_skip: int = 1,
                        v_parameterization: bool | None = None, model_files: tuple = (), tryit: TryIt | None = None,
                        progress: RegProgress | None = None,
                        should_stop: Callable[[], bool] | None = None) -> list[Path]:
    """Fill ``reg_folder`` up to ``count`` images; returns the new files (empty when enough exist).

    ``size`` is (width, height). Pass the GUI's ``TryIt`` to reuse an already loaded model.
    ``should_stop`` is polled between images; what was made so far is kept. Raises DeviceBusy while a
    training run holds the device; the batch holds it from the first image to the last.
    """
    folder = Path(reg_folder)
    missing = max(0, int(count) - len(existing_images(folder)))
    if missing == 0:
        return []
    if not class_prompt.strip():
        raise ValueError("a class prompt is needed to generate regularisation images (e.g. 'photo of a dog')")
    folder.mkdir(parents=True, exist_ok=True)
    first_seed = seed if seed >= 0 else random.SystemRandom().randint(0, MAX_SEED)
    request = GenerateRequest(base_model, class_prompt, negative_prompt, width=size[0], height=size[1], steps=steps,
                              cfg_scale=cfg_scale, sampler=sampler, clip_skip=clip_skip,
                              v_parameterization=v_parameterization, model_files=model_files)
    tryit = tryit or TryIt()
    made: list[Path] = []
    if progress is not None:
        progress(0, missing)
    with tryit.hold_device(REG_IMAGES):
        for index in range(missing):
            if should_stop is not None and should_stop():
                break
            image_seed = (first_seed + index) % (MAX_SEED + 1)
            image = tryit.generate(replace(request, seed=image_seed))[0]
            made.append(_save(image, folder, class_prompt, image_seed))
            if progress is not None:
                progress(index + 1, missing)
    return made


def _save(image, folder: Path, prompt: str, seed: int) -> Path:
    from PIL.PngImagePlugin import PngInfo

    from trainer.safety import atomic_write

    path = _free_name(folder, f"reg_{_slug(prompt)}_{seed}")
    info = PngInfo()
    info.add_text("parameters", image.info.get("parameters", ""))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return path


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "class"


def _free_name(folder: Path, stem: str) -> Path:
    path, number = folder / f"{stem}.png", 1
    while path.exists():
        path, number = folder / f"{stem}-{number}.png", number + 1
    return path
