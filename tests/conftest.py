"""Shared pytest fixtures. Everything here is offline and session-scoped (built once).

Model fixtures return folders built by ``trainer.devtools.synthetic``; treat them
as read-only (copy a folder before modifying it).
"""
from __future__ import annotations

import os

# Before anything imports huggingface_hub: tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest


@pytest.fixture(scope="session", autouse=True)
def nekoya_cache_dir(tmp_path_factory):
    """Point Nekoya's cache (materialised config folders etc.) at a per-session temp dir."""
    path = tmp_path_factory.mktemp("nekoya_cache")
    previous = os.environ.get("NEKOYA_CACHE_DIR")
    os.environ["NEKOYA_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("NEKOYA_CACHE_DIR", None)
    else:
        os.environ["NEKOYA_CACHE_DIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def nekoya_queue_dir(tmp_path_factory):
    """Apps built by tests keep their job queue in a per-session temp dir, never a developer's own queue."""
    path = tmp_path_factory.mktemp("nekoya_queue")
    previous = os.environ.get("NEKOYA_QUEUE_DIR")
    os.environ["NEKOYA_QUEUE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("NEKOYA_QUEUE_DIR", None)
    else:
        os.environ["NEKOYA_QUEUE_DIR"] = previous


# ---- tiny random models (trainer.devtools.synthetic) -------------------------

def _tiny_dir(tmp_path_factory, family):
    from trainer.devtools.synthetic import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp(f"tiny_{family}") / "model", family=family, seed=0)


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    """Diffusers folder of a tiny random SD1-shaped pipeline (64 px -> 8x8 latents)."""
    return _tiny_dir(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    """Tiny SD2-shaped pipeline (linear projections, gelu text encoder, pad "!"), epsilon."""
    return _tiny_dir(tmp_path_factory, "sd2")


@pytest.fixture(scope="session")
def tiny_sd2v_dir(tmp_path_factory):
    """Tiny SD2-shaped pipeline with a v_prediction scheduler."""
    return _tiny_dir(tmp_path_factory, "sd2v")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """Tiny SDXL-shaped pipeline (two text encoders, text_time conditioning)."""
    return _tiny_dir(tmp_path_factory, "sdxl")


def _tiny_file(tmp_path_factory, pipeline_dir, family):
    from trainer.devtools.synthetic import save_single_file

    out = tmp_path_factory.mktemp(f"tiny_{family}_file") / f"tiny_{family}.safetensors"
    return save_single_file(pipeline_dir, out)


@pytest.fixture(scope="session")
def tiny_sd1_file(tmp_path_factory, tiny_sd1_dir):
    """tiny_sd1_dir as an original-layout single .safetensors (tokenizer sidecar: <file>.tokenizers/)."""
    return _tiny_file(tmp_path_factory, tiny_sd1_dir, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_file(tmp_path_factory, tiny_sd2_dir):
    """tiny_sd2_dir as a single file (OpenCLIP text-encoder layout)."""
    return _tiny_file(tmp_path_factory, tiny_sd2_dir, "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_file(tmp_path_factory, tiny_sdxl_dir):
    """tiny_sdxl_dir as a single file (SGM conditioner layout)."""
    return _tiny_file(tmp_path_factory, tiny_sdxl_dir, "sdxl")


# ---- datasets ------------------------------------------------------------------

@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """kohya-layout train_data_dir: "10_sks dog" (4 images) and "5_cat" (3), captions on all, mixed sizes."""
    from trainer.devtools.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("images") / "img"
    return make_image_folder(root, {"10_sks dog": 4, "5_cat": 3}, sizes=[(64, 64), (96, 64), (64, 96)], seed=0)
