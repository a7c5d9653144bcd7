"""Tiny SD 3 / 3.5 fixtures (session-scoped): a diffusers SD3 folder, an SD 3.5-like one, and SAI files from it."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from trainer.devtools.tiny_sd3 import build_tiny_sd3_folder

    return build_tiny_sd3_folder(tmp_path_factory.mktemp("tiny_sd3") / "sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_sd35_dir(tmp_path_factory):
    """q/k RMS norm and an MMDiT-X self-attention in block 0 (SD 3.5 Medium's kind)."""
    from trainer.devtools.tiny_sd3 import build_tiny_sd3_folder

    return build_tiny_sd3_folder(tmp_path_factory.mktemp("tiny_sd3") / "sd35", seed=1, sd35=True)


@pytest.fixture(scope="session")
def tiny_sd3_files(tmp_path_factory, tiny_sd3_dir):
    """SAI files of tiny_sd3_dir's weights (with and without encoders) and the separate clip_l/clip_g/t5xxl."""
    from trainer.devtools.tiny_sd3 import write_sd3_single_files

    return write_sd3_single_files(tiny_sd3_dir, tmp_path_factory.mktemp("tiny_sd3_files"))


@pytest.fixture(scope="session")
def tiny_sd3_fp8_files(tmp_path_factory, tiny_sd3_dir):
    from trainer.devtools.tiny_sd3 import write_sd3_single_files

    return write_sd3_single_files(tiny_sd3_dir, tmp_path_factory.mktemp("tiny_sd3_fp8"), dtype=torch.float8_e4m3fn)
