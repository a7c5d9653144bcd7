"""LoRA inspect and verify: modules, ranks, alphas, norms, metadata, and key matching against a base model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from test_tools_support import adapter, components, one_thread, random_lora  # noqa: F401  (fixture)
from trainer.network import LoRANetwork, NetworkSpec
from trainer.network.targets import UNET_ATTENTION_CLASSES, UNET_CONV_CLASSES, LoraTarget, Role
from trainer.tools import LoraFormatError, inspect_lora, read_lora, verify_lora

METADATA = {
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "1.0"}),
    "ss_base_model_version": "sd_v1",
    "ss_learning_rate": "0.0001",
    "ss_optimizer": "torch.optim.adamw.AdamW",
    "ss_training_started_at": "1700000000.0",
    "ss_training_comment": "None",
    "ss_tag_frequency": json.dumps({"10_sks dog": {"sks dog": 10, "grass": 3}, "5_cat": {"cat": 5, "grass": 4}}),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("inspect")


@pytest.fixture(scope="module")
def sd1_lora(folder, tiny_sd1_dir):
    return random_lora(folder, tiny_sd1_dir, "sd1_locon_meta", metadata=METADATA)


def test_inspect_reports_every_module_with_rank_alpha_kind_and_norm(sd1_lora, tiny_sd1_dir):
    report = inspect_lora(sd1_lora)
    parts = components(tiny_sd1_dir)
    spec = NetworkSpec(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)
    network = LoRANetwork.build(adapter(parts).lora_targets(), spec)
    network.load_lora_state_dict(read_lora(sd1_lora).tensors())
    expected = {m.lora_name: m for m in network.lora_modules()}
    assert {m.name for m in report.modules} == set(expected)
    for info in report.modules:
        module = expected[info.name]
        assert (info.rank, info.alpha) == (module.rank, module.alpha.item())
        assert info.norm == pytest.approx(module.delta_weight().norm().item(), rel=1e-4)
        assert info.delta_shape == tuple(module.org_module.weight.shape)
    kinds = {m.name: m.kind for m in report.modules}
    assert kinds["lora_unet_down_blocks_0_resnets_0_conv1"] == "conv3x3"
    assert kinds["lora_unet_down_blocks_0_attentions_0_proj_in"] == "conv1x1"  # SD1 projections are 1x1 convs
    assert kinds["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == "linear"
    roles = {m.role for m in report.modules}
    assert roles == {"UNet", "text encoder"}
    assert report.problems == [] and report.dtypes == ("float32",)


def test_inspect_reads_training_settings_from_metadata(sd1_lora):
    report = inspect_lora(sd1_lora)
    assert report.base_version == "SD 1.x"
    rows = dict(report.settings)
    assert rows["network dim"] == "4" and rows["network alpha"] == "2.0"
    assert rows["network args"] == "conv_dim=2 conv_alpha=1.0"
    assert rows["optimizer"] == "torch.optim.adamw.AdamW"
    assert rows["started"].startswith("2023-11-1")
    assert "comment" not in rows  # "None" is sd-scripts' spelling of "no comment"
    assert len(rows["model hash (sshs)"]) == 12
    assert report.top_tags[:2] == [("sks dog", 10), ("grass", 7)]
    text = report.format(modules=True)
    assert "rank 4 alpha 2" in text and "conv rank 2 alpha 1" in text and "SD 1.x" in text
    assert "lora_unet_down_blocks_0_resnets_0_conv1  conv3x3 r2 a1" in text
    assert json.dumps(report.to_dict())  # JSON-serialisable for the CLI's --json


def test_verify_matches_every_key_of_the_right_base(sd1_lora, tiny_sd1_dir, tiny_sd1_file):
    for base in (tiny_sd1_dir, tiny_sd1_file):
        report = verify_lora(sd1_lora, base)
        assert report.ok and report.matched == len(read_lora(sd1_lora).modules)
        assert report.unmatched == [] and report.shape_mismatches == []
        assert report.base_layers == {"lora_te": 12, "lora_unet": report.matched - 12}
        assert report.format().startswith("OK: ")


def test_verify_lists_unmatched_and_wrong_shape_keys_for_another_family(sd1_lora, tiny_sdxl_dir, tiny_sd2_dir):
    report = verify_lora(sd1_lora, tiny_sdxl_dir)
    assert not report.ok
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in report.unmatched  # SDXL has lora_te1/te2
    wrong = {name: (a, b) for name, a, b in report.shape_mismatches}
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    assert wrong[name] == ((64, 32), (64, 96))  # cross-attention width 32 vs SDXL's 96
    assert report.matched + len(report.unmatched) + len(report.shape_mismatches) == len(read_lora(sd1_lora).modules)
    text = report.format(limit=2)
    assert text.startswith("MISMATCH: ") and "more unmatched" in text
    # SD2 projections are Linear: the tiny SD1 LoRA's 1x1-conv projection modules still fit them
    assert verify_lora(sd1_lora, tiny_sd2_dir).ok


def test_sdxl_lora_with_diffusers_unet_names_matches_through_aliases(tmp_path, tiny_sdxl_dir):
    parts = components(tiny_sdxl_dir)
    target = LoraTarget("lora_unet", parts.unet, UNET_ATTENTION_CLASSES, Role.UNET, UNET_CONV_CLASSES)
    network = LoRANetwork.build([target], NetworkSpec(rank=2, alpha=1.0))
    path = tmp_path / "diffusers_names.safetensors"
    save_file(network.lora_state_dict(), str(path))
    report = verify_lora(path, tiny_sdxl_dir)
    assert report.ok and report.matched == report.matched_by_alias == len(network.lora_modules())
    assert "A1111 may not" in report.format()
    assert inspect_lora(path).family_from_keys is None  # diffusers names and tiny widths: cannot tell


def test_sgm_names_say_sdxl_and_widths_tell_sd1_from_sd2(tmp_path):
    def family(tensors):
        path = tmp_path / "f.safetensors"
        save_file(tensors, str(path))
        return inspect_lora(path).family_from_keys

    def module(name, width):
        return {f"{name}.lora_down.weight": torch.zeros(2, width), f"{name}.lora_up.weight": torch.zeros(8, 2)}

    assert family(module("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768)) == "sd1"
    assert family(module("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024)) == "sd2"
    assert family(module("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 1024)) == "sd2"
    assert family(module("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640)) == "sdxl"


def test_foreign_and_incomplete_keys_are_problems_not_modules(tmp_path):
    tensors = {
        "lora_unet_a_to_q.lora_down.weight": torch.randn(2, 8),
        "lora_unet_a_to_q.lora_up.weight": torch.randn(8, 2),  # no alpha: alpha = rank
        "lora_unet_b_to_k.lora_down.weight": torch.randn(2, 8),  # no up
        "lora_unet_c_conv1.lora_down.weight": torch.randn(2, 8, 3, 3),
        "lora_unet_c_conv1.lora_up.weight": torch.randn(8, 2, 1, 1),
        "lora_unet_c_conv1.lora_mid.weight": torch.randn(2, 2, 3, 3),  # CP decomposition: not up @ down
        "lora_unet_d_to_v.hada_w1_a": torch.randn(8, 2),
        "lora_unet_e_to_out_0.lora_down.weight": torch.randn(2, 8),
        "lora_unet_e_to_out_0.lora_up.weight": torch.randn(8, 3),  # ranks disagree
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    lora = read_lora(path)
    assert list(lora.modules) == ["lora_unet_a_to_q"]
    assert lora.modules["lora_unet_a_to_q"].alpha == 2.0
    text = "\n".join(lora.problems)
    for expected in ("LoHa", "lora_mid", "lora_unet_b_to_k: no lora_up", "lora_unet_e_to_out_0: lora_down (2, 8)"):
        assert expected in text
    only_loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_d_to_v.hada_w1_a": torch.randn(8, 2)}, str(only_loha))
    with pytest.raises(LoraFormatError, match="LoHa"):
        read_lora(only_loha)


def test_ckpt_lora_files_are_read_weights_only(tmp_path, sd1_lora):
    path = tmp_path / "lora.ckpt"
    torch.save(read_lora(sd1_lora).tensors(), path)
    assert set(read_lora(path).modules) == set(read_lora(sd1_lora).modules)
    with pytest.raises(LoraFormatError, match="not found"):
        read_lora(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("config, family, expected", [
    ("sd15", "sd1", {"lora_unet": 192, "lora_te": 72}),
    ("sd21", "sd2", {"lora_unet": 192, "lora_te": 138}),  # 23 text layers: diffusers drops OpenCLIP's last
    ("sdxl_base", "sdxl", {"lora_unet": 722, "lora_te1": 72, "lora_te2": 192}),
])
def test_real_architectures_have_sd_scripts_module_counts(config, family, expected):
    """The layer index the tools match against, built weightless for the real architectures (reference §1.1)."""
    from trainer.checkpoints import shipped_config_dir
    from trainer.tools.base_modules import base_modules, empty_models_from_configs

    unet, encoders = empty_models_from_configs(shipped_config_dir(config))
    assert base_modules(family, unet, encoders, with_conv=False).count_by_prefix() == expected
