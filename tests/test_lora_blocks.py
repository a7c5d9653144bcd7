"""Block-wise LoRA (sd-scripts' networks.lora): block numbering, lr-weight curves, ranks per block, and the
learning rate each optimizer group actually gets."""
from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open

from test_train import images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer.lora_blocks import block_count, block_index, block_plan
from trainer.loop import train
from trainer.preflight import check
from trainer.settings import TrainingSettings


def test_block_numbers_are_sd_scripts():
    # SD 1.x/2.x: 1 + 3i + j down, 12 mid, 13 + 3i + j up; resamplers take j = 2
    assert block_index("lora_unet_down_blocks_0_attentions_0_proj_in", False) == 1
    assert block_index("lora_unet_down_blocks_1_resnets_1_conv1", False) == 5
    assert block_index("lora_unet_down_blocks_2_downsamplers_0_conv", False) == 9
    assert block_index("lora_unet_mid_block_attentions_0_proj_out", False) == 12
    assert block_index("lora_unet_up_blocks_3_attentions_2_proj_out", False) == 24
    assert block_index("lora_te_text_model_encoder_layers_0_mlp_fc1", False) == -1
    # SDXL (SGM names): 0 time embedding, 1-9 input, 10-12 middle, 13-21 output, 22 out
    assert block_index("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", True) == 5
    assert block_index("lora_unet_middle_block_1_proj_in", True) == 11
    assert block_index("lora_unet_output_blocks_8_0_in_layers_2", True) == 21
    assert (block_count(False), block_count(True)) == (25, 23)


def test_curves_thresholds_and_zero_blocks_follow_sd_scripts():
    s = TrainingSettings(down_lr_weight="cosine+0.1", mid_lr_weight="0.5", up_lr_weight="0,0,1",
                         block_lr_zero_threshold="0.2")
    plan = block_plan(s, False, None, 1.0)
    down = [math.sin(math.pi * (i / 11) / 2) + 0.1 for i in reversed(range(12))]
    expected_down = [w if w > 0.2 else 0 for w in down]
    assert list(plan.lr_weights[:12]) == pytest.approx(expected_down)
    assert plan.lr_weights[12] == 0.5
    assert list(plan.lr_weights[13:]) == [0, 0, 1] + [1.0] * 9  # a short list is filled with 1
    assert plan.dims[0] == 8 and plan.dims[11] == 0 and plan.dims[13] == 0  # weight 0: no module
    sdxl = block_plan(TrainingSettings(mid_lr_weight="1,0,1"), True, 4, 2.0)
    assert len(sdxl.lr_weights) == 23 and sdxl.lr_weights[0] == sdxl.lr_weights[22] == 1.0
    assert sdxl.dims[11] == 0 and sdxl.conv_dims[11] == 0 and sdxl.conv_dims[10] == 4


def test_the_check_names_a_wrong_block_list(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    for key, value, words in (("block_dims", "4,4", "has 2 values; this model has 25"),
                              ("down_lr_weight", "wave", "neither a list of numbers"),
                              ("block_alphas", "a," * 24 + "a", "numbers separated by commas")):
        values = {"block_dims": "4," * 24 + "4", key: value}
        settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", **values)
        errors = [p for p in check(settings, deep=False).errors if p.field == key]
        assert errors and words in errors[0].message, (key, [p.message for p in check(settings, deep=False).errors])
    alone = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", block_alphas="1," * 24 + "1")
    assert [p for p in check(alone, deep=False).warnings if p.field == "block_alphas"]


@pytest.mark.slow
def test_block_weights_and_dims_shape_the_file_and_the_group_learning_rates(tiny_sd1_dir, images, tmp_path,  # noqa: F811
                                                                            monkeypatch):
    from trainer.optim import stepper

    seen = {}
    original = stepper.OptimizerStepper.__init__

    def recording(self, optimizer, *args, **kwargs):
        seen.update({g["name"]: g["lr"] for g in optimizer.param_groups})
        original(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(stepper.OptimizerStepper, "__init__", recording)
    dims = [2] * 12 + [6] + [4] * 12
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", unet_lr=1e-3, max_train_steps=1,
                             down_lr_weight="1,0", mid_lr_weight="0.5", up_lr_weight="1,1,1,1,0.25", block_dims=",".join(map(str, dims)))
    result = train(settings)
    assert result.status == "finished", result.error
    with safe_open(result.files[-1], "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        args = json.loads(f.metadata()["ss_network_args"])
    unet = {k.split(".")[0] for k in shapes if k.startswith("lora_unet_")}
    blocks = {block_index(name, False) for name in unet}
    # down_lr_weight's first entry is block 0 (conv_in, never a LoRA): "1,0" puts block 1 at weight 0
    assert blocks == {12, 16, 17}  # the tiny UNet's attention blocks: down 1 (weight 0: no module), mid, up 16/17
    for name in unet:
        rank = shapes[f"{name}.lora_down.weight"][0]
        assert rank == dims[block_index(name, False)], name
    assert seen["unet_block12"] == pytest.approx(5e-4)
    assert seen["unet_block16"] == pytest.approx(1e-3) and seen["unet_block17"] == pytest.approx(2.5e-4)
    assert "unet_block1" not in seen and "unet" not in seen
    assert args["down_lr_weight"] == "1,0" and args["block_dims"] == ",".join(map(str, dims))


def test_dylora_ignores_block_settings_as_sd_scripts_and_the_check_says_so(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    from trainer.network_spec import NetworkSpec

    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type="Kohya DyLoRA", conv_dim=4,
                             down_lr_weight="0,1", block_dims="4," * 24 + "4")
    assert NetworkSpec.from_settings(settings).blocks is None
    warned = {p.field for p in check(settings, deep=False).warnings}
    assert {"down_lr_weight", "block_dims"} <= warned
