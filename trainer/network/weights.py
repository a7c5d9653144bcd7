"""Reading an existing LoRA file to continue from (``network_weights``, ``dim_from_weights``)."""
from __future__ import annotations

import os

import torch


def read_lora_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a kohya LoRA file (.safetensors, or a torch-saved state dict, weights-only).

    A damaged or unsafe file is a NetworkConfigError naming the file and the field, never the library's text."""
    from trainer.checkpoints.errors import CheckpointError
    from trainer.checkpoints.reader import TensorSource

    from .network import NetworkConfigError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"network weights file not found: {path}")
    try:
        with TensorSource(path) as source:
            return {key: source.get(key) for key in source.keys()}
    except CheckpointError as exc:
        raise NetworkConfigError(f"Network weights: {exc}", "network_weights") from exc


def ranks_and_alphas(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module rank (rows of lora_down) and alpha; a missing alpha means alpha = rank."""
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        if part == "lora_down.weight":
            ranks[name] = int(value.shape[0])
        elif part == "alpha":
            alphas[name] = float(value.float().item())
    for name, rank in ranks.items():
        alphas.setdefault(name, float(rank))
    return ranks, {name: alphas[name] for name in ranks}
