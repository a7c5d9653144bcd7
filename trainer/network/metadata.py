"""The metadata of a LoRA file: sd-scripts' ``ss_*`` keys, ``modelspec.*`` and sshs hashes.

A1111, ComfyUI and civitai read these keys (base model version, output name,
tag frequency, hashes), so names and value forms follow ``train_network.py``;
every value is a ``str``.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from trainer.settings import setting_infos

MODELSPEC_VERSION = "1.0.1"
NETWORK_MODULE = "networks.lora"


@dataclass(frozen=True)
class VersionInfo:
    """What a model family says about itself in the file (from ``family.version_metadata()``)."""

    base_model_version: str  # ss_base_model_version: sd_v1, sd_v2, sd_v1_v, sd_v2_v, sdxl_base_v1-0
    v2: bool
    architecture: str  # modelspec.architecture without the "/lora" suffix
    implementation: str  # modelspec.implementation
    prediction_type: str  # "epsilon" or "v"
    # sd-scripts' module for this family's Standard LoRA where it has its own (networks.lora_sd3), for ss_network_module
    lora_module: str | None = None


@dataclass(frozen=True)
class DatasetFacts:
    """The dataset summary sd-scripts writes in command-line dataset mode."""

    num_train_images: int  # with repeats
    num_reg_images: int
    num_batches_per_epoch: int
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    bucket_info: dict | None = None


def dataset_facts(plan: Any) -> DatasetFacts:
    """Summarise a ``trainer.data.plan.StepPlan`` the way sd-scripts does."""
    dirs: dict[bool, dict[str, dict[str, int]]] = {False: {}, True: {}}
    captions: dict[str, list[str]] = {}
    for entry in plan.entries:
        item = entry.item
        info = dirs[item.is_reg].setdefault(item.folder, {"n_repeats": item.repeats, "img_count": 0})
        info["img_count"] += 1
        captions.setdefault(item.folder, []).append(item.caption)
    buckets = {str(i): {"resolution": list(size), "count": count} for i, (size, count) in enumerate(plan.buckets)}
    return DatasetFacts(
        num_train_images=plan.train_samples,
        num_reg_images=plan.reg_samples,
        num_batches_per_epoch=plan.batches_per_epoch,
        dataset_dirs=dirs[False],
        reg_dataset_dirs=dirs[True],
        tag_frequency={folder: tag_frequency(texts) for folder, texts in captions.items()},
        bucket_info={"buckets": buckets, "mean_img_ar_error": 0.0} if buckets else None,
    )


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """Comma-separated tags, stripped and lower-cased, counted (sd-scripts' set_tag_frequency)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def model_file_hashes(path: str) -> dict[str, str]:
    """``ss_sd_model_name``/``ss_sd_model_hash``/``ss_new_sd_model_hash`` for a checkpoint file.

    Reads the whole file (seconds for a multi-GB checkpoint): call it off the hot path.
    A diffusers folder gets only its name, as sd-scripts has no file to hash.
    """
    if not path or not os.path.exists(path):
        return {}
    name = os.path.basename(os.path.normpath(path))
    if not os.path.isfile(path):
        return {"ss_sd_model_name": name}
    full = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            full.update(chunk)
    return {"ss_sd_model_name": name, "ss_sd_model_hash": legacy, "ss_new_sd_model_hash": full.hexdigest()}


def training_metadata(settings: Any, version: VersionInfo, data: DatasetFacts, run: dict[str, Any]) -> dict[str, str]:
    """The ``ss_*`` keys known when training starts.

    ``run`` holds values decided by the loop: session_id, started_at, num_epochs,
    max_train_steps, lr_warmup_steps, mixed_precision (what ran), optimizer (``module.Class(k=v,...)``), unet_lr,
    text_encoder_lr, plus optional network_args and model hashes.
    """
    s = settings
    width, height = s.resolution
    meta: dict[str, Any] = {
        "ss_session_id": run["session_id"],
        "ss_training_started_at": run["started_at"],
        "ss_text_encoder_lr": run["text_encoder_lr"],
        "ss_unet_lr": run["unet_lr"],
        "ss_num_train_images": data.num_train_images,
        "ss_num_reg_images": data.num_reg_images,
        "ss_num_batches_per_epoch": data.num_batches_per_epoch,
        "ss_num_epochs": run["num_epochs"],
        "ss_max_train_steps": run["max_train_steps"],
        "ss_lr_warmup_steps": run["lr_warmup_steps"],
        "ss_network_module": run.get("network_module", NETWORK_MODULE),
        "ss_mixed_precision": run["mixed_precision"],  # what ran, not what was asked (a CPU may run fp32)
        "ss_v2": version.v2,
        "ss_base_model_version": version.base_model_version,
        "ss_cache_latents": s.cache_latents or s.cache_latents_to_disk,
        "ss_lowram": False,
        "ss_sd_scripts_commit_hash": "nekoya",
        "ss_optimizer": run["optimizer"],
        "ss_face_crop_aug_range": None,
        "ss_total_batch_size": s.train_batch_size * s.gradient_accumulation_steps,
        "ss_resolution": f"({width}, {height})",
        "ss_dataset_dirs": json.dumps(data.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(data.reg_dataset_dirs),
        "ss_tag_frequency": json.dumps(data.tag_frequency),
        "ss_bucket_info": json.dumps(data.bucket_info) if data.bucket_info else None,
    }
    meta.update(declared_metadata(s))
    if run.get("seed") is not None:  # the seed the run drew from (seed 0 asks for a random one)
        meta["ss_seed"] = run["seed"]
    if run.get("network_args"):
        meta["ss_network_args"] = json.dumps(run["network_args"])
    meta.update(run.get("model_hashes") or {})
    return {key: str(value) for key, value in meta.items()}


def declared_metadata(settings: Any) -> dict[str, Any]:
    """The ``ss_*`` keys that record a setting as it is, from the settings declaration (``ss_key=``)."""
    return {info.ss_key: (getattr(settings, info.key) or None) if info.ss_none_if_off else getattr(settings, info.key)
            for info in setting_infos() if info.ss_key}


def modelspec_metadata(settings: Any, version: VersionInfo, timestamp: float) -> dict[str, str]:
    """SAI ModelSpec keys for a LoRA (no modelspec.hash_sha256, as sd-scripts)."""
    s = settings
    width, height = s.resolution
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{version.architecture}/lora",
        "modelspec.implementation": version.implementation,
        "modelspec.title": s.metadata_title or s.output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": version.prediction_type,
        "modelspec.implementation_version": "nekoya",
    }
    optional = {
        "modelspec.author": s.metadata_author,
        "modelspec.description": s.metadata_description,
        "modelspec.license": s.metadata_license,
        "modelspec.tags": s.metadata_tags,
        "modelspec.encoder_layer": str(s.clip_skip) if s.clip_skip else "",
    }
    if s.min_timestep > 0 or s.max_timestep < 1000:
        optional["modelspec.timestep_range"] = f"{s.min_timestep},{s.max_timestep}"
    meta.update({k: v for k, v in optional.items() if v})
    return meta


def saved_metadata(base: dict[str, str], modelspec: dict[str, str], steps: int, epoch: int, finished_at: float) -> dict[str, str]:
    """Everything but the sshs hashes, which depend on the tensors (see ``trainer.saving``)."""
    meta = dict(base)
    meta.update(modelspec)
    meta.update({"ss_steps": str(steps), "ss_epoch": str(epoch), "ss_training_finished_at": str(finished_at)})
    return meta
