"""Read a component's weights from a diffusers/transformers folder and build a lean model around them.

A component folder (``unet/``, ``vae/``, ``text_encoder/`` ...) holds ``config.json``
and its weights; which files are read is :mod:`trainer.checkpoints.weight_files`' rule
(the preflight check and the size estimate follow the same one). A legacy ``.bin`` is
read with ``weights_only=True``. Models are built on the meta device and take the file's
tensors as their own (no random initialisation of a billion parameters first).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from trainer.checkpoints.weight_files import UnreadableIndex, component_weight_files
from trainer.problems import NekoyaError


class WeightsError(NekoyaError, RuntimeError):
    """The folder's weights are missing or do not fit the architecture."""


def weight_files(folder: Path) -> list[Path]:
    """The weight files of one component folder, by trainer.checkpoints.weight_files' rule; every one must exist."""
    try:
        files = component_weight_files(folder)
    except UnreadableIndex as exc:
        raise WeightsError(str(exc)) from None
    if not files:
        raise WeightsError(f"{folder} has no weights "
                           "(expected diffusion_pytorch_model.safetensors or model.safetensors)")
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise WeightsError(f"{folder}: its shard index names files that do not exist ({', '.join(missing)})")
    return files


def read_state_dict(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(path)))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def fit_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Bridge the text encoder's ``text_model.`` prefix between transformers 4 and 5 layouts, and drop
    the ``position_ids`` buffers older transformers saved."""
    fitted = {}
    for key, tensor in state.items():
        if key not in expected:
            if key.startswith("text_model.") and key[len("text_model."):] in expected:
                key = key[len("text_model."):]
            elif "text_model." + key in expected:
                key = "text_model." + key
            elif key.endswith("position_ids"):
                continue
        fitted[key] = tensor
    return fitted


def build_with_weights(factory: Callable[[], nn.Module], state: dict[str, torch.Tensor], dtype: torch.dtype,
                       source: str) -> nn.Module:
    """``factory()`` on the meta device, then the tensors of ``state`` (cast to ``dtype``) as its parameters."""
    with torch.device("meta"):
        model = factory()
    expected = set(model.state_dict())
    state = fit_keys(state, expected)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsError(f"{source}: the weights do not fit the architecture in its config "
                           f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                           f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_component(folder: Path, factory: Callable[[dict], nn.Module], dtype: torch.dtype) -> nn.Module:
    """A lean model from ``folder/config.json`` and the folder's weights."""
    config = json.loads((folder / "config.json").read_text())
    state = read_state_dict(weight_files(folder))
    return build_with_weights(lambda: factory(config), state, dtype, str(folder))
