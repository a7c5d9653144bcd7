"""SDXL LoRA key names: sd-scripts' SGM block names, checked against the architecture rules.

The expected names are computed here from diffusers module paths with the SGM
numbering rules (not with ``trainer.network.sgm_names``), for the real SDXL
architecture (built on the meta device, no memory) and for the tiny test model.
"""
from __future__ import annotations

import os
import re
import types

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer.families.sdxl import SDXLFamily
from trainer.network import LoRANetwork, NetworkSpec, find_target_layers
from trainer.network.metadata import modelspec_metadata
from trainer.network.sgm_names import sgm_unet_view

DIFFUSERS_TARGETS = ("Transformer2DModel",)
DIFFUSERS_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
RESNET_RENAMES = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection"}
BLOCK_WORDS = {"down_blocks": "input_blocks", "mid_block": "middle_block", "up_blocks": "output_blocks"}
TE_CHILDREN = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


# -- the rules, written out independently ---------------------------------------------------------
def sgm_path(path: str, config) -> str:
    """diffusers module path -> SGM path, from the block-numbering rules."""
    step = config.layers_per_block + 1
    rules = [
        (r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)",
         lambda i, kind, j, rest: f"input_blocks.{1 + step * i + j}.{1 if kind == 'attentions' else 0}.{rest}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv", lambda i: f"input_blocks.{step * (i + 1)}.0.op"),
        (r"mid_block\.attentions\.0\.(.+)", lambda rest: f"middle_block.1.{rest}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda j, rest: f"middle_block.{2 * j}.{rest}"),
        (r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)",
         lambda i, kind, j, rest: f"output_blocks.{step * i + j}.{1 if kind == 'attentions' else 0}.{rest}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv",
         lambda i: f"output_blocks.{step * i + step - 1}.{2 if 'CrossAttn' in config.up_block_types[i] else 1}.conv"),
    ]
    for pattern, build in rules:
        match = re.fullmatch(pattern, path)
        if match:
            groups = [int(g) if g.isdigit() else g for g in match.groups()]
            if "resnets" in path:  # the resnet's own layer is the last group
                groups[-1] = RESNET_RENAMES[groups[-1]]
            return build(*groups)
    raise AssertionError(f"no SGM rule for {path}")


def diffusers_layers(unet, with_conv: bool) -> dict[str, torch.nn.Module]:
    """diffusers path -> layer, for every Linear/Conv2d sd-scripts puts a LoRA on."""
    classes = DIFFUSERS_TARGETS + (DIFFUSERS_CONV_TARGETS if with_conv else ())
    layers = {}
    for path, module in unet.named_modules():
        if type(module).__name__ in classes:
            for child_path, child in module.named_modules():
                if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    layers[f"{path}.{child_path}"] = child
    return layers


def expected_unet_names(unet, with_conv: bool) -> set[str]:
    return {"lora_unet_" + sgm_path(p, unet.config).replace(".", "_") for p in diffusers_layers(unet, with_conv)}


def expected_te_names(prefix: str, encoder) -> set[str]:
    return {f"{prefix}_text_model_encoder_layers_{n}_{c}" for n in range(encoder.config.num_hidden_layers)
            for c in TE_CHILDREN}


# -- models ---------------------------------------------------------------------------------------
def family_with(unet, te1, te2, cache_te: bool = False) -> SDXLFamily:
    settings = types.SimpleNamespace(v_parameterization=False, sdxl_cache_text_encoder_outputs=cache_te,
                                     sdxl_no_half_vae=False)
    family = SDXLFamily(settings)
    family.unet, family.text_encoders = unet, (te1, te2)
    return family


@pytest.fixture(scope="module")
def full_sdxl():
    """The real SDXL base architecture (UNet, CLIP-L, OpenCLIP-G) on the meta device."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from trainer.checkpoints.shipped import read_component_config, shipped_config_source

    source = shipped_config_source("sdxl_base")
    with init_empty_weights():
        unet = diffusers.UNet2DConditionModel.from_config(read_component_config(source, "unet"))
        te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(source / "text_encoder"))
        te2 = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig.from_pretrained(source / "text_encoder_2"))
    return family_with(unet, te1, te2)


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_sdxl_dir):
    from trainer.checkpoints import load_pipeline_components

    parts = load_pipeline_components(tiny_sdxl_dir, family_hint="sdxl")
    return family_with(parts.unet, *parts.text_encoders)


def names(family, with_conv: bool) -> dict[str, set[str]]:
    by_prefix: dict[str, set[str]] = {}
    for target in family.lora_targets():
        by_prefix[target.prefix] = {layer.lora_name for layer in find_target_layers(target, with_conv)}
    return by_prefix


# -- tests ----------------------------------------------------------------------------------------
def test_full_sdxl_module_counts_match_sd_scripts(full_sdxl):
    found = names(full_sdxl, with_conv=False)
    # sd-scripts / ComfyUI: 722 UNet modules, 72 CLIP-L and 192 OpenCLIP-G modules
    assert {prefix: len(n) for prefix, n in found.items()} == {"lora_unet": 722, "lora_te1": 72, "lora_te2": 192}


@pytest.mark.parametrize("with_conv", [False, True])
@pytest.mark.parametrize("model", ["full_sdxl", "tiny_sdxl"])
def test_key_set_equals_architecture_rules(request, model, with_conv):
    family = request.getfixturevalue(model)
    found = names(family, with_conv)
    assert found["lora_unet"] == expected_unet_names(family.unet, with_conv)
    assert found["lora_te1"] == expected_te_names("lora_te1", family.text_encoders[0])
    assert found["lora_te2"] == expected_te_names("lora_te2", family.text_encoders[1])


def test_reference_examples_are_named_exactly(full_sdxl):
    found = names(full_sdxl, with_conv=True)["lora_unet"]
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
        "lora_unet_output_blocks_0_1_proj_out",
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_input_blocks_1_0_emb_layers_1",
        "lora_unet_input_blocks_1_0_out_layers_3",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_output_blocks_5_2_conv",
    ):
        assert name in found, name
    assert not any("down_blocks" in n or "mid_block" in n or "up_blocks" in n for n in found)


@pytest.mark.parametrize("model", ["full_sdxl", "tiny_sdxl"])
def test_view_covers_exactly_the_diffusers_layers(request, model):
    """Every layer sd-scripts targets gets one SGM name, and no other layer does."""
    family = request.getfixturevalue(model)
    target = family.lora_targets()[0]
    view_layers = {id(layer.module) for layer in find_target_layers(target, with_conv=True)}
    assert view_layers == {id(m) for m in diffusers_layers(family.unet, with_conv=True).values()}
    named = {layer.lora_name: layer.module for layer in find_target_layers(target, with_conv=True)}
    for path, module in diffusers_layers(family.unet, with_conv=True).items():
        assert named["lora_unet_" + sgm_path(path, family.unet.config).replace(".", "_")] is module, path


@pytest.mark.parametrize("model", ["full_sdxl", "tiny_sdxl"])
def test_diffusers_sgm_remap_finds_the_same_blocks(request, model):
    """diffusers' own SGM -> diffusers block remap sends every key back to its module's block.

    The remap renumbers blocks only; the block words (input_blocks, ...) and SGM layer
    names are renamed later by diffusers' key conversion.
    """
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    family = request.getfixturevalue(model)
    target = family.lora_targets()[0]
    layers = find_target_layers(target, with_conv=True)
    state = {f"{layer.lora_name}.lora_down.weight": torch.zeros(()) for layer in layers}
    remapped = _maybe_map_sgm_blocks_to_diffusers(state, family.unet.config)
    expected = set()
    for path in diffusers_layers(family.unet, with_conv=True):
        block, _, leaf = path.rpartition(".")
        if ".resnets." in path:
            path = f"{block}.{RESNET_RENAMES[leaf]}"
        elif ".downsamplers." in path:
            path = f"{block}.op"
        for diffusers_word, sgm_word in BLOCK_WORDS.items():
            path = path.replace(diffusers_word, sgm_word)
        expected.add("lora_unet_" + path.replace(".", "_") + ".lora_down.weight")
    assert set(remapped) == expected


def test_cached_text_encoder_outputs_train_the_unet_only(tiny_sdxl):
    family = family_with(tiny_sdxl.unet, *tiny_sdxl.text_encoders, cache_te=True)
    network = LoRANetwork.build(family.lora_targets(), NetworkSpec(rank=2))
    keys = {name for name, _ in network.named_children()}
    assert keys and all(k.startswith("lora_unet_") for k in keys)


def test_version_metadata_is_sd_scripts_sdxl():
    from trainer.settings import TrainingSettings

    family = family_with(None, None, None)
    version = family.version_metadata()
    assert (version.base_model_version, version.v2, version.prediction_type) == ("sdxl_base_v1-0", False, "epsilon")
    spec = modelspec_metadata(TrainingSettings(sdxl=True, max_resolution="1024,1024"), version, 0.0)
    assert spec["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert spec["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert spec["modelspec.resolution"] == "1024x1024"
