"""Extract a LoRA from a fine-tune minus its base: a LoRA merged then extracted at the same rank reproduces
the original's weight changes and outputs; lower ranks give the best approximation; text encoder, conv and
metadata rules."""
from __future__ import annotations

import pytest
import torch

from test_tools_support import (  # noqa: F401  (fixture)
    apply_lora_files, components, one_thread, random_lora, text_outputs, unet_output,
)
from trainer.tools import ToolError, extract_lora, merge_into_checkpoint, read_lora, verify_lora

EXACT = dict(clamp_quantile=None, min_diff=0.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("extract")


@pytest.fixture(scope="module")
def sd1_merged(folder, tiny_sd1_dir):
    """(original LoRA, checkpoint = tiny SD1 + 0.5 × LoRA) with linear, 1x1 and 3x3 conv modules."""
    lora = random_lora(folder, tiny_sd1_dir, "sd1_locon")
    return lora, merge_into_checkpoint(tiny_sd1_dir, [(lora, 0.5)], folder / "sd1_tuned.safetensors").out_path


def assert_same_deltas(extracted, original, ratio):
    assert set(extracted.modules) == set(original.modules)
    for name, module in original.modules.items():
        expected = module.delta(ratio)
        got = extracted.modules[name].delta()
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_merged_then_extracted_lora_reproduces_the_original(folder, sd1_merged, tiny_sd1_dir):
    lora, tuned = sd1_merged
    result = extract_lora(tiny_sd1_dir, tuned, folder / "sd1_extracted.safetensors", 4, conv_rank=2, **EXACT)
    extracted, original = read_lora(result.out_path), read_lora(lora)
    assert_same_deltas(extracted, original, 0.5)
    ranks = {(m.kind, m.rank, m.alpha) for m in extracted.modules.values()}
    assert ranks == {("linear", 4, 4.0), ("conv1x1", 4, 4.0), ("conv3x3", 2, 2.0)}  # alpha = rank: scale 1
    assert result.overall_error < 1e-4 and result.text_encoder_included and result.unchanged == 0
    # the effect: the base with the extracted LoRA applied by the trainer's network gives the tuned model's outputs
    base, tuned_parts = components(tiny_sd1_dir), components(tuned)
    networks = apply_lora_files(base, [(result.out_path, 1.0)])
    try:
        torch.testing.assert_close(unet_output(base.unet), unet_output(tuned_parts.unet), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(text_outputs(base)[0], text_outputs(tuned_parts)[0], rtol=1e-4, atol=1e-4)
    finally:
        for network in reversed(networks):
            network.restore()


def test_sdxl_round_trip_from_a_single_file(folder, tiny_sdxl_dir, tiny_sdxl_file):
    lora = random_lora(folder, tiny_sdxl_dir, "sdxl_locon")
    tuned = merge_into_checkpoint(tiny_sdxl_file, [(lora, 1.0)], folder / "sdxl_tuned.safetensors").out_path
    result = extract_lora(tiny_sdxl_file, tuned, folder / "sdxl_extracted.safetensors", 4, conv_rank=2, **EXACT)
    assert_same_deltas(read_lora(result.out_path), read_lora(lora), 1.0)
    meta = result.metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert verify_lora(result.out_path, tiny_sdxl_dir).ok


def test_lower_rank_extraction_is_the_best_approximation(folder, sd1_merged, tiny_sd1_dir):
    lora, tuned = sd1_merged
    result = extract_lora(tiny_sd1_dir, tuned, folder / "sd1_r2.safetensors", 2, conv_rank=1, **EXACT)
    extracted, original = read_lora(result.out_path), read_lora(lora)
    for info in result.modules:
        diff = original.modules[info.name].delta(0.5)
        singular = torch.linalg.svdvals(diff.reshape(diff.shape[0], -1))
        best = singular[info.rank:].pow(2).sum().sqrt() / singular.pow(2).sum().sqrt()
        assert info.relative_error == pytest.approx(float(best), rel=1e-3, abs=1e-5)
        measured = (extracted.modules[info.name].delta() - diff).norm() / diff.norm()
        assert float(measured) == pytest.approx(info.relative_error, rel=1e-3, abs=1e-5)
    assert {m.rank for m in result.modules} == {1, 2} and 0 < result.overall_error < 1


def test_clamping_bounds_the_factor_values(folder, sd1_merged, tiny_sd1_dir):
    lora, tuned = sd1_merged
    exact = extract_lora(tiny_sd1_dir, tuned, folder / "exact.safetensors", 4, conv_rank=2, **EXACT)
    clamped = extract_lora(tiny_sd1_dir, tuned, folder / "clamped.safetensors", 4, conv_rank=2, clamp_quantile=0.9,
                           min_diff=0.0)
    exact_lora, clamped_lora = read_lora(exact.out_path), read_lora(clamped.out_path)
    for name, module in clamped_lora.modules.items():
        values = torch.cat([exact_lora.modules[name].up.flatten(), exact_lora.modules[name].down.flatten()]).abs()
        limit = values.sort().values[int(round(0.9 * (values.numel() - 1)))]
        assert module.up.abs().max() <= limit + 1e-7 and module.down.abs().max() <= limit + 1e-7
    assert clamped.overall_error > exact.overall_error


def test_unchanged_text_encoder_and_conv_layers_are_left_out(folder, tiny_sd1_dir):
    unet_only = random_lora(folder, tiny_sd1_dir, "sd1_attention_only", conv_rank=0, roles=("unet",))
    tuned = merge_into_checkpoint(tiny_sd1_dir, [unet_only], folder / "sd1_unet_tuned.safetensors").out_path
    plain = extract_lora(tiny_sd1_dir, tuned, folder / "plain.safetensors", 4, **EXACT)
    assert not plain.text_encoder_included and plain.text_encoder_max_diff == 0.0
    assert len(plain.modules) == 48 and plain.unchanged == 0  # no conv_rank: ResNet layers are not looked at
    assert all(m.name.startswith("lora_unet_") for m in plain.modules)
    assert "left out" in plain.format()
    with_conv = extract_lora(tiny_sd1_dir, tuned, folder / "with_conv.safetensors", 4, conv_rank=2, **EXACT)
    assert len(with_conv.modules) == 48 and with_conv.unchanged == 79 - 48  # identical ResNet layers: no module
    assert plain.metadata["ss_network_args"] == "{}"
    assert with_conv.metadata["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "2.0"}'
    assert (plain.metadata["ss_network_dim"], plain.metadata["ss_network_alpha"]) == ("4", "4.0")
    assert plain.metadata["ss_base_model_version"] == "sd_v1"


def test_extract_refuses_other_families_and_identical_models(folder, tiny_sd1_dir, tiny_sd1_file, tiny_sd2_dir):
    with pytest.raises(ToolError, match="is an SD 2.x model but"):
        extract_lora(tiny_sd1_dir, tiny_sd2_dir, folder / "x.safetensors", 4)
    with pytest.raises(ToolError, match="nothing to extract"):
        extract_lora(tiny_sd1_dir, tiny_sd1_file, folder / "x.safetensors", 4)
    assert not (folder / "x.safetensors").exists()
