"""Try it: base model + kohya LoRA at a weight, side-by-side comparisons, on tiny SD1/SD2-v/SDXL models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.inference import GenerateRequest, LoraChoice, LoraMismatchError, TryIt
from trainer.network.network import LoRANetwork, NetworkSpec


def make_lora(family, path, seed: int, conv: bool = False):
    """A kohya LoRA file for the family's model, strong random weights (a trained LoRA's up weights are not 0)."""
    network = LoRANetwork.build(family.lora_targets(), NetworkSpec(rank=4, alpha=2, conv_rank=2 if conv else 0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.lora_modules():
            for weight in (module.lora_down.weight, module.lora_up.weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    save_file(network.lora_state_dict(), str(path))
    return str(path)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def gen_request(model, **overrides) -> GenerateRequest:
    values = dict(base_model=str(model), prompt="a photo of sks dog", negative_prompt="blurry", width=64, height=64,
                  steps=2, seed=11, cfg_scale=5.0, sampler="euler")
    values.update(overrides)
    return GenerateRequest(**values)


@pytest.fixture(scope="module")
def tryit():
    return TryIt(device="cpu")


@pytest.fixture(scope="module")
def sd1_loras(tryit, tiny_sd1_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tryit_loras")
    family = tryit.load(str(tiny_sd1_dir)).family
    return make_lora(family, folder / "a.safetensors", 1, conv=True), make_lora(family, folder / "b.safetensors", 2)


@pytest.mark.slow
def test_weight_zero_is_the_base_model_and_weights_change_the_image(tryit, tiny_sd1_dir, sd1_loras):
    lora_a, _ = sd1_loras
    base, zero, low, full, base_again = tryit.compare(gen_request(tiny_sd1_dir), [
        LoraChoice(None), LoraChoice(lora_a, 0.0), LoraChoice(lora_a, 0.4), LoraChoice(lora_a, 0.8), LoraChoice(None)])
    assert np.array_equal(pixels(base[0]), pixels(zero[0]))
    assert np.array_equal(pixels(base[0]), pixels(base_again[0]))  # the LoRA was removed cleanly
    diff_low = np.abs(pixels(low[0]) - pixels(base[0])).mean()
    diff_full = np.abs(pixels(full[0]) - pixels(base[0])).mean()
    assert 0 < diff_low < diff_full
    assert [image.info["lora"] for image in (base[0], full[0])] == ["base model", "a @ 0.8"]


def test_two_loras_side_by_side_share_the_seed(tryit, tiny_sd1_dir, sd1_loras):
    lora_a, lora_b = sd1_loras
    progress = []
    side = tryit.compare(gen_request(tiny_sd1_dir, count=2), [LoraChoice(lora_a), LoraChoice(lora_b)],
                         lambda done, total: progress.append((done, total)))
    assert [[image.info["seed"] for image in images] for images in side] == [[11, 12], [11, 12]]
    assert not np.array_equal(pixels(side[0][0]), pixels(side[1][0]))
    alone = tryit.generate(gen_request(tiny_sd1_dir, count=2, lora=lora_b, weight=0.8))
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(alone, side[1]))
    assert progress == [(i, 8) for i in range(1, 9)]  # 2 LoRAs x 2 images x 2 steps, one call per step


def test_base_model_and_loras_are_cached(tryit, tiny_sd1_dir, sd1_loras):
    tryit.generate(gen_request(tiny_sd1_dir, lora=sd1_loras[0], steps=1))
    model, cached = tryit.model, dict(tryit._loras)
    tryit.generate(gen_request(tiny_sd1_dir, lora=sd1_loras[0], steps=1, seed=-1))
    assert tryit.model is model and tryit._loras == cached


def test_random_seed_is_reported_and_repeats(tryit, tiny_sd1_dir):
    first = tryit.generate(gen_request(tiny_sd1_dir, seed=-1))[0]
    again = tryit.generate(gen_request(tiny_sd1_dir, seed=first.info["seed"]))[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert f"Seed: {first.info['seed']}" in first.info["parameters"]


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny_sd2v_dir", "tiny_sdxl_dir"])
def test_sd2_v_and_sdxl_loras(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    tryit = TryIt(device="cpu")
    lora = make_lora(tryit.load(str(model)).family, tmp_path / "l.safetensors", 3)
    base, zero, weighted = tryit.compare(gen_request(model, sampler="euler_a"),
                                         [LoraChoice(None), LoraChoice(lora, 0.0), LoraChoice(lora, 1.0)])
    assert tryit.model.family.v_prediction == (fixture == "tiny_sd2v_dir")
    assert np.array_equal(pixels(base[0]), pixels(zero[0]))
    assert np.abs(pixels(weighted[0]) - pixels(base[0])).mean() > 0.5
    assert len({k.split("_")[1] for k in load_file(lora) if k.startswith("lora_te")}) == (
        2 if fixture == "tiny_sdxl_dir" else 1)  # te1/te2 for SDXL, te for SD2: both applied


def test_conv_shaped_lora_on_linear_layers_gives_the_same_image(tryit, tiny_sd1_dir, sd1_loras, tmp_path):
    """Some writers store Linear LoRAs as 1x1 convs (SD2 proj_in/proj_out in sd-scripts' models)."""
    tensors = load_file(sd1_loras[1])
    as_conv = {k: (v[:, :, None, None] if v.dim() == 2 else v) for k, v in tensors.items()}
    path = tmp_path / "conv.safetensors"
    save_file(as_conv, str(path))
    linear, conv = tryit.compare(gen_request(tiny_sd1_dir), [LoraChoice(sd1_loras[1]), LoraChoice(str(path))])
    assert np.array_equal(pixels(linear[0]), pixels(conv[0]))


def test_lora_for_another_family_is_refused(tryit, tiny_sd1_dir, sd1_loras, tmp_path):
    # SDXL LoRAs name UNet blocks the SGM way and have two text encoders: nothing of that is in SD1
    sgm = {"lora_unet_down_blocks_": "lora_unet_input_blocks_", "lora_unet_up_blocks_": "lora_unet_output_blocks_",
           "lora_unet_mid_block_": "lora_unet_middle_block_", "lora_te_": "lora_te2_"}
    renamed = {}
    for key, value in load_file(sd1_loras[1]).items():
        for old, new in sgm.items():
            key = key.replace(old, new)
        renamed[key] = value
    save_file(renamed, str(tmp_path / "xl.safetensors"))
    with pytest.raises(LoraMismatchError, match="does not fit this SD1 model"):
        tryit.generate(gen_request(tiny_sd1_dir, lora=str(tmp_path / "xl.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(LoraMismatchError, match="junk.safetensors"):
        tryit.generate(gen_request(tiny_sd1_dir, lora=str(tmp_path / "junk.safetensors")))
    assert tryit.generate(gen_request(tiny_sd1_dir, steps=1))  # the base model is still usable


def test_partly_matching_lora_is_applied_with_a_note(tiny_sd1_dir, sd1_loras, tmp_path):
    tensors = load_file(sd1_loras[1])
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, 4)
    path = tmp_path / "extra.safetensors"
    save_file(tensors, str(path))
    notes = []
    tryit = TryIt(device="cpu", log=lambda message, level="info": notes.append((level, message)))
    tryit.generate(gen_request(tiny_sd1_dir, lora=str(path), steps=1))
    assert any(level == "warning" and "1 module(s) of extra.safetensors have no layer" in m for level, m in notes)


def test_half_vae_that_overflows_decodes_again_in_fp32(tiny_sd1_dir, monkeypatch):
    from trainer.inference.generate import ImageGenerator, ImageSpec

    model = TryIt(device="cpu").load(str(tiny_sd1_dir))  # its own copy: the VAE weights get rounded here
    vae = model.family.vae
    vae.to(dtype=torch.bfloat16).to(dtype=torch.float32)  # weights a half VAE holds, in fp32
    generator = ImageGenerator(model.family, model.device)
    spec = ImageSpec("a dog", width=64, height=64, steps=1, seed=3, sampler="euler")
    expected = pixels(generator.generate(spec))
    decode = vae.decode

    def overflowing_in_half(latents):
        out = decode(latents)
        if latents.dtype == torch.bfloat16:  # what an fp16 SDXL VAE does on large activations
            out.sample.fill_(float("nan"))
        return out

    monkeypatch.setattr(vae, "decode", overflowing_in_half)
    vae.to(dtype=torch.bfloat16)
    image = generator.generate(spec)
    assert vae.dtype == torch.bfloat16  # put back after the fp32 retry
    assert np.array_equal(pixels(image), expected)
