"""Tiny FLUX.1 fixtures (session-scoped): a diffusers dev folder, schnell, and kohya_ss's four files from it."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    from trainer.devtools.tiny_flux import build_tiny_flux_folder

    return build_tiny_flux_folder(tmp_path_factory.mktemp("tiny_flux") / "dev", seed=0, guidance=True)


@pytest.fixture(scope="session")
def tiny_flux_files(tmp_path_factory, tiny_flux_dir):
    """BFL transformer + clip_l + t5xxl + ae files of tiny_flux_dir's weights."""
    from trainer.devtools.tiny_flux import write_flux_single_files

    return write_flux_single_files(tiny_flux_dir, tmp_path_factory.mktemp("tiny_flux_files"))


@pytest.fixture(scope="session")
def tiny_flux_fp8_files(tmp_path_factory, tiny_flux_dir):
    """The same four files stored in float8_e4m3fn."""
    from trainer.devtools.tiny_flux import write_flux_single_files

    return write_flux_single_files(tiny_flux_dir, tmp_path_factory.mktemp("tiny_flux_fp8"), dtype=torch.float8_e4m3fn)


@pytest.fixture(scope="session")
def tiny_schnell_dir(tmp_path_factory):
    """A tiny FLUX.1 schnell folder: no guidance embedding."""
    from trainer.devtools.tiny_flux import build_tiny_flux_folder

    return build_tiny_flux_folder(tmp_path_factory.mktemp("tiny_flux") / "schnell", seed=1, guidance=False)
