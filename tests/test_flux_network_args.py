"""The Flux1 LoRA type's network settings as kohya_ss passes them and sd-scripts' ``networks.lora_flux`` applies them:
split_qkv, the per-module ranks (img_attn_dim ... single_mod_dim), in_dims and the block selections.

The expected module names and ranks are written here from sd-scripts' rules and BFL's architecture
(``sd_scripts_module_names``), not read from Nekoya's modules.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from flux_support import tiny_flux_dir  # noqa: F401  (fixture)
from test_flux_family import sd_scripts_module_names
from test_train import images, tiny_settings  # noqa: F401  (images is a fixture)
from trainer.families.flux_spec import DOUBLE_BLOCKS, SINGLE_BLOCKS
from trainer.models.flux import Flux, FluxConfig
from trainer.network_spec import NetworkConfigError, NetworkSpec
from trainer.problems import NekoyaError
from trainer.settings import TrainingSettings

EMBEDDERS = {"img_in": ("lora_unet_img_in",), "time_in": ("lora_unet_time_in_in_layer", "lora_unet_time_in_out_layer"),
             "vector_in": ("lora_unet_vector_in_in_layer", "lora_unet_vector_in_out_layer"),
             "guidance_in": ("lora_unet_guidance_in_in_layer", "lora_unet_guidance_in_out_layer"),
             "txt_in": ("lora_unet_txt_in",)}


def flux1(**values) -> TrainingSettings:
    return TrainingSettings(flux1_checkbox=True, LoRA_type="Flux1", network_dim=4, network_alpha=1,
                            flux1_cache_text_encoder_outputs=True, **values)


def full_size_network(settings: TrainingSettings):
    """The run's network on FLUX.1's full architecture (weights on the meta device; LoRA weights are real)."""
    from trainer.families.flux import FluxFamily
    from trainer.network.network import LoRANetwork

    family = FluxFamily(settings)
    with torch.device("meta"):
        family.unet = Flux(FluxConfig())
    return LoRANetwork.build(family.lora_targets(), NetworkSpec.from_settings(settings))


def ranks(network) -> dict[str, int]:
    """Module name -> rank, read from the file's tensors (lora_down's rows)."""
    return {key.split(".")[0]: value.shape[0] for key, value in network.lora_state_dict().items()
            if key.endswith("lora_down.weight")}


def test_kohya_ss_passes_the_flux1_network_args_in_its_order():
    from trainer.network.build import network_args

    settings = flux1(img_attn_dim="8", single_mod_dim="0", in_dims="[4,0,0,0,4]", train_double_block_indices="0-5,10",
                     split_qkv=True, train_t5xxl=True, rank_dropout=0.1)
    args = network_args(settings, NetworkSpec.from_settings(settings))
    # lora_gui.py: kohya_lora_var_list (the filled-in ones, train_model's order), split_qkv, train_t5xxl, dropouts
    assert list(args.items()) == [("img_attn_dim", "8"), ("single_mod_dim", "0"), ("in_dims", "[4,0,0,0,4]"),
                                  ("train_double_block_indices", "0-5,10"), ("train_single_block_indices", "all"),
                                  ("split_qkv", "True"), ("train_t5xxl", "True"), ("rank_dropout", "0.1")]
    # empty settings are not passed; "all" (kohya_ss's default) is
    assert network_args(flux1(), NetworkSpec.from_settings(flux1())) == {
        "train_double_block_indices": "all", "train_single_block_indices": "all"}


def test_split_qkv_keeps_sd_scripts_keys_with_stacked_down_and_block_diagonal_up_weights():
    network = full_size_network(flux1(split_qkv=True))
    tensors = network.lora_state_dict()
    assert {k.split(".")[0] for k in tensors} == sd_scripts_module_names(DOUBLE_BLOCKS, SINGLE_BLOCKS)
    assert {k.split(".", 1)[1] for k in tensors} == {"lora_down.weight", "lora_up.weight", "alpha"}
    # sd-scripts' split_dims: [3072] * 3 for qkv, [3072] * 3 + [12288] for linear1; each part has rank 4
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (3 * 4, 3072)
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (9216, 3 * 4)
    assert tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (4 * 4, 3072)
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 4 * 4)
    assert tensors["lora_unet_single_blocks_0_linear2.lora_down.weight"].shape == (4, 15360)  # not split
    assert float(tensors["lora_unet_single_blocks_0_linear1.alpha"]) == 1.0  # alpha as given (per part's rank)


def test_a_split_module_adds_each_parts_update_and_its_file_form_loads_back():
    from torch import nn

    from trainer.network.split_qkv import SplitLoRAModule

    torch.manual_seed(0)
    base = nn.Linear(6, 3 * 6 + 10)
    module = SplitLoRAModule("lora_unet_single_blocks_0_linear1", base, 2, 1.0, [6, 6, 6, 10])
    parts_up = [torch.randn(width, 2) for width in (6, 6, 6, 10)]
    with torch.no_grad():
        for up, weight in zip(module.lora_up, parts_up):
            up.weight.copy_(weight)
    module.apply_to()
    x = torch.randn(5, 6)
    expected = x @ base.weight.T + base.bias
    for i, (down, up) in enumerate(zip(module.lora_down, parts_up)):  # each part: its rows of the output
        part = torch.zeros(5, 28)
        start = sum((6, 6, 6, 10)[:i])
        part[:, start:start + up.shape[0]] = x @ down.weight.T @ up.T * 0.5
        expected = expected + part
    torch.testing.assert_close(base(x), expected)
    sd = module.state_dict()
    up = sd["lora_up.weight"]
    assert up.shape == (28, 8) and torch.count_nonzero(up[:6, 2:]) == 0 and torch.equal(up[18:, 6:], parts_up[3])
    other = SplitLoRAModule("lora_unet_single_blocks_0_linear1", nn.Linear(6, 28), 2, 1.0, [6, 6, 6, 10])
    other.load_state_dict(sd)
    for a, b in zip([*module.lora_down, *module.lora_up], [*other.lora_down, *other.lora_up]):
        assert torch.equal(a.weight, b.weight)


def test_a_module_types_rank_replaces_the_network_rank_and_0_leaves_it_out():
    network = full_size_network(flux1(img_mlp_dim="0", single_dim="8", txt_mod_dim="2"))

    def expected(name: str) -> int:  # sd-scripts' type_dims identifiers
        if "img_mlp" in name:
            return 0
        if "single_blocks" in name and "linear" in name:  # linear1, linear2 (not modulation_lin)
            return 8
        return 2 if "txt_mod" in name else 4

    names = sd_scripts_module_names(DOUBLE_BLOCKS, SINGLE_BLOCKS)
    assert ranks(network) == {n: expected(n) for n in names if expected(n)}
    tensors = network.lora_state_dict()
    assert tensors["lora_unet_single_blocks_3_linear2.lora_up.weight"].shape == (3072, 8)
    assert tensors["lora_unet_double_blocks_3_txt_mod_lin.lora_down.weight"].shape == (2, 3072)


def test_in_dims_give_the_input_embedders_their_ranks():
    network = full_size_network(flux1(in_dims="[4,0,2,0,6]"))
    given = {"img_in": 4, "vector_in": 2, "txt_in": 6}  # time_in and guidance_in: 0
    blocks = {n: 4 for n in sd_scripts_module_names(DOUBLE_BLOCKS, SINGLE_BLOCKS)}
    assert ranks(network) == {**blocks, **{n: r for e, r in given.items() for n in EMBEDDERS[e]}}
    assert network.lora_state_dict()["lora_unet_img_in.lora_down.weight"].shape == (4, 64)


def test_block_selections_train_the_listed_blocks_only():
    network = full_size_network(flux1(train_double_block_indices="0-2,10", train_single_block_indices="none",
                                      single_dim="8"))
    names = sd_scripts_module_names(DOUBLE_BLOCKS, 0)
    chosen = {n for n in names if int(n.split("_")[4]) in (0, 1, 2, 10)}
    assert ranks(network) == {n: 4 for n in chosen}
    only_last = full_size_network(flux1(train_double_block_indices="none", train_single_block_indices="37"))
    assert set(ranks(only_last)) == {f"lora_unet_single_blocks_37_{m}" for m in ("linear1", "linear2", "modulation_lin")}


@pytest.mark.parametrize(("key", "value", "says"), [
    ("train_double_block_indices", "0-5,19", "from 0 to 18"), ("train_single_block_indices", "5-2", "'0-5,10'"),
    ("train_double_block_indices", "0,,1", "'all', 'none'"), ("in_dims", "[4,0]", "[4,0,0,0,4]"),
    ("img_attn_dim", "4.5", "whole number"), ("single_mod_dim", "-1", "whole number"),
])
def test_a_value_sd_scripts_would_refuse_is_named_by_the_check(key, value, says, tmp_path):
    from trainer.preflight import check

    with pytest.raises(NetworkConfigError) as raised:
        NetworkSpec.from_settings(flux1(**{key: value}))
    assert isinstance(raised.value, NekoyaError) and raised.value.field == key and says in str(raised.value)
    report = check(flux1(output_dir=str(tmp_path), **{key: value}), deep=False)
    assert [p.field for p in report.errors if p.field == key] == [key]


def test_the_settings_are_applied_not_named_as_unused(tmp_path):
    from trainer.preflight import check
    from trainer.preflight.report import SettingNotApplied

    report = check(flux1(output_dir=str(tmp_path), split_qkv=True, img_attn_dim="8", in_dims="[4,0,0,0,4]",
                         train_single_block_indices="0-3"), deep=False)
    assert not [p for p in report.warnings if isinstance(p, SettingNotApplied)
                and p.field in ("split_qkv", "img_attn_dim", "in_dims", "train_single_block_indices")]


@pytest.mark.slow
def test_a_two_step_run_writes_sd_scripts_keys_shapes_and_network_args(tiny_flux_dir, images, tmp_path):
    from trainer.loop import train

    settings = tiny_settings(tiny_flux_dir, images, tmp_path / "out", flux1_checkbox=True, LoRA_type="Flux1",
                             max_train_steps=2, t5xxl_max_token_length=16, network_dim=4, split_qkv=True,
                             img_mlp_dim="0", single_dim="8", in_dims="[2,0,0,2,2]", train_double_block_indices="1",
                             train_single_block_indices="0", flux1_cache_text_encoder_outputs=True)
    result = train(settings)
    assert result.status == "finished", result.error
    with safe_open(str(tmp_path / "out" / "tiny.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        metadata = f.metadata()
    # the tiny model: 2 double and 2 single blocks of width 64 (MLP 256), guidance embedder (dev)
    double = {n for n in sd_scripts_module_names(2, 0) if "_double_blocks_1_" in n and "img_mlp" not in n}
    single = {f"lora_unet_single_blocks_0_{m}" for m in ("linear1", "linear2", "modulation_lin")}
    embedders = {n for e in ("img_in", "guidance_in", "txt_in") for n in EMBEDDERS[e]}
    assert {k.split(".")[0] for k in shapes} == double | single | embedders
    assert shapes["lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight"] == (3 * 4, 64)
    assert shapes["lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight"] == (3 * 64, 3 * 4)
    assert shapes["lora_unet_single_blocks_0_linear1.lora_down.weight"] == (4 * 8, 64)  # single_dim 8, split in 4
    assert shapes["lora_unet_single_blocks_0_linear1.lora_up.weight"] == (3 * 64 + 256, 4 * 8)
    assert shapes["lora_unet_single_blocks_0_modulation_lin.lora_down.weight"] == (4, 64)
    assert shapes["lora_unet_img_in.lora_down.weight"] == (2, 64)
    assert json.loads(metadata["ss_network_args"]) == {
        "img_mlp_dim": "0", "single_dim": "8", "in_dims": "[2,0,0,2,2]", "train_double_block_indices": "1",
        "train_single_block_indices": "0", "split_qkv": "True"}


def test_diffusers_converts_a_split_qkv_file_into_separate_q_k_v_loras():
    """diffusers' FluxPipeline.load_lora_weights converter takes the block-diagonal form apart (its "sparse" branch):
    each of q, k, v (and the MLP input) gets its own part's rank-4 LoRA, not a copy of the stacked down weight."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from trainer.network.split_qkv import SplitLoRAModule

    network = full_size_network(flux1(split_qkv=True))
    with torch.no_grad():
        for module in network.lora_modules():
            for up in module.lora_up if isinstance(module, SplitLoRAModule) else [module.lora_up]:
                up.weight.normal_()
    converted = _convert_kohya_flux_lora_to_diffusers(network.lora_state_dict())
    double = "transformer.transformer_blocks.0.attn"
    single = "transformer.single_transformer_blocks.0"
    assert converted[f"{double}.to_q.lora_A.weight"].shape == (4, 3072)
    assert converted[f"{double}.add_v_proj.lora_B.weight"].shape == (3072, 4)
    assert converted[f"{single}.proj_mlp.lora_A.weight"].shape == (4, 3072)
    assert converted[f"{single}.proj_mlp.lora_B.weight"].shape == (12288, 4)
    split = network.get_submodule("lora_unet_double_blocks_0_img_attn_qkv")  # k's own down and up weights
    for diffusers_weight, part in ((f"{double}.to_k.lora_A.weight", split.lora_down[1].weight),
                                   (f"{double}.to_k.lora_B.weight", split.lora_up[1].weight)):
        converted_part = converted[diffusers_weight].float()
        torch.testing.assert_close(converted_part / converted_part.norm(), part / part.norm())
