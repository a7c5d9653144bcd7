"""The lean UNet equals diffusers' UNet2DConditionModel: same keys, same outputs, same gradients."""
from __future__ import annotations

import json
from pathlib import Path

import diffusers  # the reference: a missing diffusers fails these tests (it is pinned in the test extra)
import pytest
import torch

from trainer.devtools.tiny_specs import TINY_SPECS
from trainer.models.unet import UNet2DConditionModel

SHIPPED = Path(__file__).resolve().parent.parent / "trainer" / "checkpoints" / "configs"


def _pair(family: str, config: dict | None = None):
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**(config or TINY_SPECS[family].unet)).eval()
    with torch.no_grad():
        for param in reference.parameters():  # diffusers zero-inits some layers: make every path count
            param.normal_(0, 0.2)
    ours = UNet2DConditionModel(dict(reference.config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def _inputs(family: str, batch: int = 2, height: int = 8, width: int = 8):
    spec = TINY_SPECS[family].unet
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, height, width, generator=generator)
    context = torch.randn(batch, 77, spec["cross_attention_dim"], generator=generator)
    kwargs = {}
    if spec.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 64, generator=generator),
            "time_ids": torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 64.0]] * batch),
        }
    return sample, context, kwargs


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_same_outputs_as_diffusers(family):
    reference, ours = _pair(family)
    sample, context, kwargs = _inputs(family)
    timesteps = torch.tensor([3, 871])
    with torch.no_grad():
        expected = reference(sample, timesteps, context, **kwargs).sample
        got = ours(sample, timesteps, context, **kwargs)
    assert expected.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_odd_latent_sizes_and_scalar_timesteps(family):
    """Latents that are not a multiple of 2**upsamplers take diffusers' forwarded upsample size."""
    reference, ours = _pair(family)
    sample, context, kwargs = _inputs(family, batch=1, height=10, width=14)
    with torch.no_grad():
        expected = reference(sample, 500, context, **kwargs).sample
        got = ours(sample, 500, context, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_gradients_as_diffusers(checkpointing):
    reference, ours = _pair("sd2")
    if checkpointing:
        ours.enable_gradient_checkpointing()
    sample, context, _ = _inputs("sd2")
    grads = []
    for model, pick in ((reference, lambda out: out.sample), (ours, lambda out: out)):
        x, c = sample.clone().requires_grad_(True), context.clone().requires_grad_(True)
        model.zero_grad()
        pick(model(x, torch.tensor([10, 500]), c)).square().mean().backward()
        grads.append((x.grad, c.grad, model.get_submodule("down_blocks.0.resnets.0.conv1").weight.grad))
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("config_folder", ["sd15", "sd21", "sdxl_base"])
def test_real_architectures_have_diffusers_keys_and_shapes(config_folder):
    config = json.loads((SHIPPED / config_folder / "unet" / "config.json").read_text())
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config(config)
        ours = UNet2DConditionModel(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected


def test_module_class_names_are_the_lora_targets():
    ours = UNet2DConditionModel(TINY_SPECS["sd1"].unet)
    names = {type(m).__name__ for m in ours.modules()}
    assert {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"} <= names


def test_unsupported_config_is_refused_by_name():
    with pytest.raises(ValueError, match="class_embed_type"):
        UNet2DConditionModel({**TINY_SPECS["sd1"].unet, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNet2DConditionModel({**TINY_SPECS["sd1"].unet,
                              "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})


def test_sdxl_without_size_conditioning_says_what_is_missing():
    _, ours = _pair("sdxl")
    sample, context, _ = _inputs("sdxl")
    with pytest.raises(ValueError, match="time_ids"):
        ours(sample, 10, context)


@pytest.mark.slow
def test_attention_backend_is_swappable_and_xformers_falls_back_with_a_message():
    from trainer.families.sd import SD1Family
    from trainer.models.attention import load_xformers, sdpa_attention

    _, ours = _pair("sd1")
    sample, context, _ = _inputs("sd1")
    with torch.no_grad():
        expected = ours(sample, 10, context)
    calls = []

    def counting(q, k, v, heads, batch):
        calls.append(heads)
        return sdpa_attention(q, k, v, heads, batch)

    ours.set_attention_backend(counting)
    with torch.no_grad():
        torch.testing.assert_close(ours(sample, 10, context), expected)
    assert len(calls) == 2 * 4  # self + cross attention of 4 transformer blocks (down 1, mid 1, up 2)
    with pytest.raises(RuntimeError, match="CUDA"):
        load_xformers(torch.device("cpu"), torch.float32)

    family = SD1Family.__new__(SD1Family)  # only the UNet matters for set_attention
    family.unet = ours
    messages = []
    family.set_attention("xformers", lambda message, level="info": messages.append((level, message)))
    assert messages and messages[0][0] == "warning" and "using PyTorch SDPA attention instead" in messages[0][1]
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(ours(sample, 10, context), expected)
    assert not calls  # back on SDPA
