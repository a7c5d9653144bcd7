"""Reading users' Stable Diffusion checkpoints offline (diffusers folders and single files).

Public API (heavy libraries are imported only when a function runs):

* :func:`detect` -> :class:`ModelInfo` (family, format, v-parameterisation, problems)
* :func:`infer_config_dir` -> config-only diffusers folder for a single file
* :func:`load_pipeline_components` -> :class:`Components` (unet, vae, text encoders, tokenizers, scheduler config)
* :func:`shipped_config_dir` -> the official SD1.5 / SD2.x / SDXL config folders
"""
from trainer.checkpoints.detect import ModelInfo, detect
from trainer.checkpoints.errors import CheckpointError, UnsafeCheckpointError
from trainer.checkpoints.infer import infer_config_dir, matching_shipped_config
from trainer.checkpoints.load import Components, load_pipeline_components, resolve_model_path
from trainer.checkpoints.shipped import SHIPPED_CONFIGS, shipped_config_dir

__all__ = [
    "CheckpointError", "Components", "ModelInfo", "SHIPPED_CONFIGS", "UnsafeCheckpointError",
    "detect", "infer_config_dir", "load_pipeline_components", "matching_shipped_config",
    "resolve_model_path", "shipped_config_dir",
]
