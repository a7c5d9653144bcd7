"""Component folders as users have them: single, sharded, fp16-variant and legacy .bin weights."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from trainer.devtools.tiny_specs import TINY_SPECS
from trainer.models.unet import UNet2DConditionModel
from trainer.models.weights import WeightsError, fit_keys, load_component


def _unet_state():
    torch.manual_seed(0)
    return UNet2DConditionModel(TINY_SPECS["sd1"].unet).state_dict()


def _folder(tmp_path, name="unet"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_SPECS["sd1"].unet}))
    return folder


def _same(model, state):
    got = model.state_dict()
    assert set(got) == set(state)
    for key, tensor in state.items():
        torch.testing.assert_close(got[key].float(), tensor.float(), atol=1e-3, rtol=1e-3)


def test_single_safetensors_loads_without_initialising(tmp_path):
    state = _unet_state()
    folder = _folder(tmp_path)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
    model = load_component(folder, UNet2DConditionModel.from_config, torch.float16)
    assert model.dtype == torch.float16 and model.device.type == "cpu" and not model.training
    _same(model, state)


def test_sharded_weights_with_an_index(tmp_path):
    state = _unet_state()
    folder = _folder(tmp_path)
    keys = sorted(state)
    halves = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2 :]}
    weight_map = {}
    for file, names in halves.items():
        save_file({k: state[k].contiguous() for k in names}, folder / file)
        weight_map.update({k: file for k in names})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _same(load_component(folder, UNet2DConditionModel.from_config, torch.float32), state)


def test_fp16_variant_and_legacy_bin(tmp_path):
    state = _unet_state()
    variant = _folder(tmp_path, "variant")
    save_file({k: v.half().contiguous() for k, v in state.items()}, variant / "diffusion_pytorch_model.fp16.safetensors")
    _same(load_component(variant, UNet2DConditionModel.from_config, torch.float32), state)
    legacy = _folder(tmp_path, "legacy")
    torch.save(state, legacy / "diffusion_pytorch_model.bin")
    _same(load_component(legacy, UNet2DConditionModel.from_config, torch.float32), state)


def test_missing_or_mismatched_weights_are_named(tmp_path):
    folder = _folder(tmp_path)
    with pytest.raises(WeightsError, match="has no weights"):
        load_component(folder, UNet2DConditionModel.from_config, torch.float32)
    state = _unet_state()
    state.pop("conv_in.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match="conv_in.weight"):
        load_component(folder, UNet2DConditionModel.from_config, torch.float32)


def test_text_model_prefix_is_bridged_both_ways():
    tensor = torch.zeros(1)
    v4 = {"text_model.embeddings.token_embedding.weight": tensor, "text_model.embeddings.position_ids": tensor}
    assert set(fit_keys(v4, {"embeddings.token_embedding.weight"})) == {"embeddings.token_embedding.weight"}
    v5 = {"embeddings.token_embedding.weight": tensor}
    assert set(fit_keys(v5, {"text_model.embeddings.token_embedding.weight"})) == {
        "text_model.embeddings.token_embedding.weight"}
