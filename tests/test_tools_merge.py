"""Merge LoRAs into a checkpoint: the merged single file, loaded back, equals the base with the LoRAs applied
(by our network and by diffusers' fuse_lora) at the same ratios; .ckpt, half precision, family extras, errors."""
from __future__ import annotations

import pytest
import torch

from test_tools_support import (  # noqa: F401  (fixture)
    apply_lora_files, components, one_thread, random_lora, text_outputs, unet_output,
)
from trainer.checkpoints import detect, load_pipeline_components
from trainer.checkpoints.reader import TensorSource
from trainer.tools import ToolError, merge_into_checkpoint
from trainer.tools.lora_file import fit_to_layer

OPENCLIP = "cond_stage_model.model."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("merge")


def with_loras_applied(base_parts, loras):
    """UNet and text-encoder outputs of the base with the LoRA files applied by the trainer's network."""
    networks = apply_lora_files(base_parts, loras)
    try:
        return unet_output(base_parts.unet), text_outputs(base_parts)
    finally:
        for network in reversed(networks):  # each wraps the forward of the one before
            network.restore()


def assert_outputs_equal(merged_parts, base_parts, loras, atol=2e-5):
    expected_unet, expected_text = with_loras_applied(base_parts, loras)
    merged_unet = unet_output(merged_parts.unet)
    assert (merged_unet - unet_output(base_parts.unet)).abs().max() > 1e-2  # the LoRAs do change the output
    torch.testing.assert_close(merged_unet, expected_unet, rtol=1e-4, atol=atol)
    for merged, expected in zip(text_outputs(merged_parts), expected_text, strict=True):
        torch.testing.assert_close(merged, expected, rtol=1e-4, atol=atol)


def diffusers_fused_weights(pipeline_cls, model_dir, lora, ratio):
    """State dicts of the pipeline's UNet and text encoders after load_lora_weights + fuse_lora(lora_scale=ratio)."""
    pipe = pipeline_cls.from_pretrained(model_dir, local_files_only=True)
    pipe.load_lora_weights(str(lora), adapter_name="tested")
    pipe.fuse_lora(lora_scale=ratio, components=pipe._lora_loadable_modules)  # UNet and every text encoder
    pipe.unload_lora_weights()  # keeps the fused weights, drops the PEFT layers
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    return pipe.unet.state_dict(), [e.state_dict() for e in encoders]


def assert_weights_equal(merged_parts, unet_sd, encoder_sds):
    assert set(merged_parts.unet.state_dict()) == set(unet_sd)
    for key, value in merged_parts.unet.state_dict().items():
        torch.testing.assert_close(value, unet_sd[key], rtol=1e-5, atol=2e-6, msg=lambda m, key=key: f"{key}: {m}")
    for encoder, expected in zip(merged_parts.text_encoders, encoder_sds, strict=True):
        for key, value in encoder.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=2e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_sd1_merge_equals_base_plus_loras_applied_by_our_network(folder, tiny_sd1_dir):
    """Two LoRAs (one LoCon with 1x1 and 3x3 convs and text encoder, one UNet-only) at ratios 0.7 and -0.4."""
    locon = random_lora(folder, tiny_sd1_dir, "sd1_locon")
    unet_only = random_lora(folder, tiny_sd1_dir, "sd1_unet_r2", rank=2, alpha=1.0, conv_rank=0, seed=1,
                            roles=("unet",))
    loras = [(locon, 0.7), (unet_only, -0.4)]
    result = merge_into_checkpoint(tiny_sd1_dir, loras, folder / "sd1_merged.safetensors")
    assert [m.merged for m in result.loras] == [91, 48] and result.dtype == "float32"  # 48: 4 transformers × 12
    info = detect(result.out_path)
    assert info.ok and info.family == "sd1" and info.format == "safetensors"
    merged = load_pipeline_components(result.out_path)
    assert_outputs_equal(merged, components(tiny_sd1_dir), loras)
    assert "sd1_locon.safetensors ×0.7 (91 modules)" in result.format()


def test_sd1_merge_equals_diffusers_fuse_lora(folder, tiny_sd1_dir):
    from diffusers import StableDiffusionPipeline

    lora = random_lora(folder, tiny_sd1_dir, "sd1_locon")
    result = merge_into_checkpoint(tiny_sd1_dir, [(lora, 0.7)], folder / "sd1_single.safetensors")
    merged = load_pipeline_components(result.out_path)
    assert_weights_equal(merged, *diffusers_fused_weights(StableDiffusionPipeline, tiny_sd1_dir, lora, 0.7))


def test_sdxl_merge_from_a_single_file_equals_our_network_and_diffusers(folder, tiny_sdxl_dir, tiny_sdxl_file):
    from diffusers import StableDiffusionXLPipeline

    lora = random_lora(folder, tiny_sdxl_dir, "sdxl_locon")
    result = merge_into_checkpoint(tiny_sdxl_file, [(lora, 0.8)], folder / "sdxl_merged.safetensors")
    assert result.family == "sdxl" and result.loras[0].merged == 143
    merged = load_pipeline_components(result.out_path)
    assert_outputs_equal(merged, components(tiny_sdxl_file), [(lora, 0.8)])
    assert_weights_equal(merged, *diffusers_fused_weights(StableDiffusionXLPipeline, tiny_sdxl_dir, lora, 0.8))
    with TensorSource(tiny_sdxl_file) as base, TensorSource(result.out_path) as out:
        assert set(out.keys()) == set(base.keys())  # the same original-layout keys as the base file


def test_half_ckpt_checkpoint(folder, tiny_sd1_dir, tiny_sd1_file):
    lora = random_lora(folder, tiny_sd1_dir, "sd1_locon")
    result = merge_into_checkpoint(tiny_sd1_file, [(lora, 1.0)], folder / "sd1_half.ckpt", half=True)
    saved = torch.load(result.out_path, map_location="cpu", weights_only=True)
    assert set(saved) == {"state_dict"}
    assert {v.dtype for v in saved["state_dict"].values() if v.is_floating_point()} == {torch.float16}
    info = detect(result.out_path)
    assert info.ok and info.format == "ckpt" and result.dtype == "float16"
    merged = load_pipeline_components(result.out_path)
    # fp16 weights move the outputs by about 1e-3; the LoRA moves them by about 0.2
    assert_outputs_equal(merged, components(tiny_sd1_file), [(lora, 1.0)], atol=5e-3)


def test_sd2_extra_text_tensors_are_made_up_for_folders_and_kept_from_files(folder, tiny_sd2_dir, tiny_sd2_file):
    lora = random_lora(folder, tiny_sd2_dir, "sd2_locon")
    from_dir = merge_into_checkpoint(tiny_sd2_dir, [(lora, 0.5)], folder / "sd2_from_dir.safetensors")
    from_file = merge_into_checkpoint(tiny_sd2_file, [(lora, 0.5)], folder / "sd2_from_file.safetensors")
    layers = components(tiny_sd2_dir).text_encoder.config.num_hidden_layers
    extra = [f"{OPENCLIP}transformer.resblocks.{layers}.ln_1.weight", f"{OPENCLIP}text_projection"]
    with TensorSource(from_dir.out_path) as made_up, TensorSource(from_file.out_path) as kept, \
            TensorSource(tiny_sd2_file) as base:
        assert all(key in made_up.keys() for key in extra)
        assert set(kept.keys()) == set(base.keys())
        for key in extra:
            assert torch.equal(kept.get(key), base.get(key))
    for result in (from_dir, from_file):
        merged = load_pipeline_components(result.out_path)
        assert merged.text_encoder.config.num_hidden_layers == layers
        assert_outputs_equal(merged, components(tiny_sd2_dir), [(lora, 0.5)])


def test_ema_weights_of_the_base_file_are_dropped_and_other_extras_kept(folder, tiny_sd1_dir, tiny_sd1_file):
    """EMA copies would be stale after a merge (A1111 does not use them); unknown extras are carried over."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny_sd1_file))
    tensors.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10),
                    "alphas_cumprod": torch.linspace(1, 0.01, 1000)})
    base = folder / "with_ema.safetensors"
    save_file(tensors, str(base))
    shutil.copytree(f"{tiny_sd1_file}.tokenizers", f"{base}.tokenizers")  # the tiny vocabulary's sidecar
    lora = random_lora(folder, tiny_sd1_dir, "sd1_locon")
    result = merge_into_checkpoint(base, [lora], folder / "no_ema.safetensors")
    with TensorSource(result.out_path) as out:
        keys = set(out.keys())
        assert not any(k.startswith("model_ema.") for k in keys)
        assert torch.equal(out.get("alphas_cumprod"), tensors["alphas_cumprod"])
    assert keys == set(tensors) - {"model_ema.decay", "model_ema.num_updates"}


def test_prediction_type_is_written_only_when_known(folder, tiny_sd2_dir, tiny_sd2_file):
    lora = random_lora(folder, tiny_sd2_dir, "sd2_locon")
    known = merge_into_checkpoint(tiny_sd2_dir, [lora], folder / "sd2_eps.safetensors")
    assert known.metadata["modelspec.prediction_type"] == "epsilon"
    unknown = merge_into_checkpoint(tiny_sd2_file, [lora], folder / "sd2_unknown.safetensors")
    assert "modelspec.prediction_type" not in unknown.metadata  # SD2 files do not say; neither do we
    assert detect(unknown.out_path).v_parameterization is None
    v_pred = merge_into_checkpoint(tiny_sd2_file, [lora], folder / "sd2_v.safetensors", v_parameterization=True)
    assert v_pred.metadata["modelspec.prediction_type"] == "v"
    assert detect(v_pred.out_path).v_parameterization is True
    assert v_pred.metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v"


def test_loras_for_another_model_or_with_unknown_modules_are_refused(folder, tiny_sd1_dir, tiny_sdxl_dir):
    from safetensors.torch import save_file

    from trainer.tools import read_lora

    sd1_lora = random_lora(folder, tiny_sd1_dir, "sd1_locon")
    with pytest.raises(ToolError, match="does not fit this SDXL model"):
        merge_into_checkpoint(tiny_sdxl_dir, [sd1_lora], folder / "wrong.safetensors")
    tensors = read_lora(sd1_lora).tensors()
    tensors.update({"lora_unet_no_such_layer.lora_down.weight": torch.ones(2, 4),
                    "lora_unet_no_such_layer.lora_up.weight": torch.ones(4, 2)})
    extra = folder / "extra_module.safetensors"
    save_file(tensors, str(extra))
    with pytest.raises(ToolError, match="1 of 92 modules match no layer"):
        merge_into_checkpoint(tiny_sd1_dir, [extra], folder / "extra.safetensors")
    assert not (folder / "extra.safetensors").exists()
    result = merge_into_checkpoint(tiny_sd1_dir, [extra], folder / "extra.safetensors", allow_unmatched=True)
    assert result.loras[0].merged == 91 and result.loras[0].unmatched == ["lora_unet_no_such_layer"]
    assert "skipped 1 modules" in result.format()
    with pytest.raises(ToolError, match="already exists"):
        merge_into_checkpoint(tiny_sd1_dir, [sd1_lora], result.out_path)
    with pytest.raises(ToolError, match="input files"):
        merge_into_checkpoint(tiny_sd1_dir, [sd1_lora], sd1_lora, overwrite=True)


def test_1x1_conv_changes_fit_linear_layers_and_back():
    delta = torch.randn(8, 4, 1, 1)
    assert fit_to_layer(delta, (8, 4)).shape == (8, 4)
    assert fit_to_layer(delta.reshape(8, 4), (8, 4, 1, 1)).shape == (8, 4, 1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        fit_to_layer(torch.randn(8, 4, 3, 3), (8, 36))
