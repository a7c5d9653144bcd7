"""Helpers shared by the LoRA tools tests (test_tools_*.py): random LoRAs for the tiny models, and
applying LoRA files to loaded models through the trainer's own network (the reference the tools must equal)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from trainer.network import LoRANetwork, NetworkSpec
from trainer.network.weights import ranks_and_alphas

_CACHE: dict = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small SVDs and matmuls are much faster on one thread on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def components(path):
    """load_pipeline_components(path) in float32, loaded once per session (treat as read-only)."""
    from trainer.checkpoints import load_pipeline_components

    key = ("components", str(path))
    if key not in _CACHE:
        _CACHE[key] = load_pipeline_components(path)
    return _CACHE[key]


def adapter(parts):
    from trainer.tools.base_modules import family_adapter

    return family_adapter(parts.family, parts.unet, parts.text_encoders)


def random_lora(folder, model_dir, name, *, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, seed=0, std=0.05,
                roles=("unet", "textencoder"), metadata=None):
    """Save a LoRA with random non-zero up weights for the model in ``model_dir``; built once per session and
    folder (a test that writes next to its input must get a file in its own folder)."""
    from trainer.saving import save_lora_file

    key = ("lora", str(folder), str(model_dir), name, rank, alpha, conv_rank, conv_alpha, seed, std, roles,
           tuple(sorted((metadata or {}).items())))
    if key in _CACHE:
        return _CACHE[key]
    targets = [t for t in adapter(components(model_dir)).lora_targets() if t.role.value in roles]
    spec = NetworkSpec(rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha)
    network = LoRANetwork.build(targets, spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.lora_modules():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * std)
            module.lora_down.weight.copy_(torch.randn(module.lora_down.weight.shape, generator=generator) * 0.3)
    path = folder / f"{name}.safetensors"
    save_lora_file(str(path), network.lora_state_dict(), dict(metadata or {"ss_network_dim": str(rank)}))
    _CACHE[key] = path
    return path


def apply_lora_files(parts, loras):
    """Apply (path, ratio) LoRA files to ``parts``' models with the trainer's LoRANetwork; returns the networks.

    Call ``restore()`` on the returned networks in reverse order to take them off again.
    """
    from trainer.network.weights import read_lora_file

    networks = []
    for path, ratio in loras:
        weights = read_lora_file(str(path))
        ranks, alphas = ranks_and_alphas(weights)
        spec = NetworkSpec(module_ranks=ranks, module_alphas=alphas)
        network = LoRANetwork.build(adapter(parts).lora_targets(), spec)
        missing, unexpected = network.load_lora_state_dict(weights)
        assert not missing and not unexpected, (missing[:3], unexpected[:3])
        network.set_multiplier(ratio)
        network.eval()
        network.apply_to()
        networks.append(network)
    return networks


def unet_inputs(unet, batch=2, seed=0, size=8):
    """Random (sample, timesteps, kwargs) for a UNet of any family (SDXL gets text_embeds/time_ids).

    8x8 latents: a config inferred from a single file says sample_size 64 (the real model's).
    """
    config = unet.config
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.in_channels, size, size, generator=g)
    context = torch.randn(batch, 7, config.cross_attention_dim, generator=g)
    kwargs = {"encoder_hidden_states": context}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}
    return sample, torch.tensor([10, 700][:batch]), kwargs


@torch.no_grad()
def unet_output(unet, seed=0):
    sample, t, kwargs = unet_inputs(unet, seed=seed)
    out = unet(sample, t, **kwargs)
    return getattr(out, "sample", out)  # Nekoya's UNet returns the tensor, diffusers' an output object


@torch.no_grad()
def text_outputs(parts):
    """Last hidden states of every text encoder for a fixed token batch."""
    ids = torch.tensor([[0, 5, 17, 300, 9, 1, 2, 2]]) % 500
    return [encoder(ids, output_hidden_states=True).hidden_states[-1] for encoder in parts.text_encoders]


def test_random_lora_covers_every_target(tmp_path, tiny_sd1_dir):
    """The helper's LoRA has a module on every LoRA-able layer, linear, 1x1 and 3x3 conv included."""
    from trainer.tools import read_lora
    from trainer.tools.base_modules import base_modules

    parts = components(tiny_sd1_dir)
    lora = read_lora(random_lora(tmp_path, tiny_sd1_dir, "cover"))
    layers = base_modules(parts.family, parts.unet, parts.text_encoders, with_conv=True).layers
    assert set(lora.modules) == set(layers)
    assert {m.kind for m in lora.modules.values()} == {"linear", "conv1x1", "conv3x3"}
    assert all(m.up.abs().sum() > 0 for m in lora.modules.values())
