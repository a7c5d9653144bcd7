"""Reading an existing LoRA file to continue from (``network_weights``, ``dim_from_weights``)."""
from __future__ import annotations

import os

import torch


def read_lora_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a kohya LoRA file (.safetensors, or a torch-saved state dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"network weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


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
