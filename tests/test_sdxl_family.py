"""The SDXL family adapter on the tiny random SDXL model: loading, conditioning, prediction, file keys."""
from __future__ import annotations

import os
import types

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer.families.sdxl import SDXLConditioning, SDXLFamily
from trainer.network import LoRANetwork, NetworkSpec

CAPTIONS = ["a photo of sks dog, masterpiece", "cat"]


def sdxl_settings(path, **overrides):
    from trainer.settings import TrainingSettings

    values = dict(pretrained_model_name_or_path=str(path), sdxl=True, clip_skip=1, unet_lr=1e-4, text_encoder_lr=1e-4)
    return TrainingSettings(**{**values, **overrides})


def load_family(path, dtype=torch.float32, **overrides):
    settings = sdxl_settings(path, **overrides)
    family, logs = SDXLFamily(settings), []
    family.load(settings, dtype, torch.device("cpu"), lambda message, level: logs.append((level, message)))
    return family, logs


@pytest.fixture(scope="module")
def family(tiny_sdxl_dir):
    return load_family(tiny_sdxl_dir)[0]


def size_batch(rows):
    """A stand-in for trainer.data.Batch: only the size conditioning is read by predict."""
    return types.SimpleNamespace(size_conditioning=lambda: torch.tensor(rows, dtype=torch.long))


# -- loading --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_single_file_loads_the_same_model_as_the_folder(family, tiny_sdxl_file):
    from_file, _ = load_family(tiny_sdxl_file)
    assert len(from_file.text_encoders) == 2 and len(from_file.tokenizers) == 2
    tokens = family.tokenize(CAPTIONS, 75)
    assert torch.equal(tokens, from_file.tokenize(CAPTIONS, 75))
    cond, cond_file = family.encode_prompt(tokens, 0), from_file.encode_prompt(tokens, 0)
    torch.testing.assert_close(cond_file.hidden_states, cond.hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(cond_file.pooled, cond.pooled, rtol=0, atol=0)
    noisy, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    batch = size_batch([[64, 64, 0, 0, 64, 64]] * 2)
    with torch.no_grad():
        torch.testing.assert_close(from_file.predict(noisy, t, cond, batch), family.predict(noisy, t, cond, batch),
                                   rtol=0, atol=0)


def test_family_constants(family):
    assert family.latent_scale == 0.13025 and family.cache_suffix == "sdxl"
    assert not family.v_prediction
    assert family.version_metadata().base_model_version == "sdxl_base_v1-0"


# -- text conditioning ----------------------------------------------------------------------------
def test_conditioning_is_both_penultimate_layers_and_the_projected_eos(family):
    te1, te2 = family.text_encoders
    tokens = family.tokenize(CAPTIONS, 75)
    assert tokens.shape == (2, 2, 1, 77)
    with torch.no_grad():
        cond = family.encode_prompt(tokens, 0)
        out1 = te1(tokens[:, 0, 0], output_hidden_states=True)
        out2 = te2(tokens[:, 1, 0], output_hidden_states=True)
    penultimate1 = out1.hidden_states[len(out1.hidden_states) - 2]  # hidden_states[11] of CLIP-L's 12 layers
    torch.testing.assert_close(cond.hidden_states, torch.cat([penultimate1, out2.hidden_states[-2]], dim=-1))
    assert cond.hidden_states.shape == (2, 77, te1.config.hidden_size + te2.config.hidden_size)
    # no final LayerNorm on the sequence states (that is SD1's clip_skip rule, not SDXL's)
    with torch.no_grad():
        normed = te1.final_layer_norm(penultimate1)
    assert not torch.allclose(cond.hidden_states[..., : te1.config.hidden_size], normed)
    # pooled: transformers' own projected EOS embedding of the OpenCLIP-G model
    torch.testing.assert_close(cond.pooled, out2.text_embeds)
    assert cond.pooled.shape == (2, te2.config.projection_dim)


def test_long_captions_keep_the_first_chunk_and_its_pool(family):
    short = family.encode_prompt(family.tokenize(CAPTIONS, 75), 0)
    with torch.no_grad():
        long = family.encode_prompt(family.tokenize(CAPTIONS, 150), 0)
    assert long.hidden_states.shape[:2] == (2, 152)
    torch.testing.assert_close(long.hidden_states[:, :76], short.hidden_states[:, :76])
    torch.testing.assert_close(long.pooled, short.pooled)


def test_clip_skip_is_ignored_with_a_warning(tiny_sdxl_dir, family):
    skipped, logs = load_family(tiny_sdxl_dir, clip_skip=2)
    assert any(level == "warning" and "clip_skip 2 is ignored" in m for level, m in logs)
    tokens = family.tokenize(CAPTIONS, 75)
    with torch.no_grad():
        torch.testing.assert_close(skipped.encode_prompt(tokens, 2).hidden_states,
                                   family.encode_prompt(tokens, 0).hidden_states)


def test_select_and_stack_round_trip(family):
    with torch.no_grad():
        cond = family.encode_prompt(family.tokenize(CAPTIONS, 75), 0)
    again = family.stack_prompts([family.select_prompt(cond, i) for i in range(2)])
    assert isinstance(again, SDXLConditioning)
    assert torch.equal(again.hidden_states, cond.hidden_states) and torch.equal(again.pooled, cond.pooled)


# -- the UNet call ----------------------------------------------------------------------------------
def test_predict_passes_pooled_and_size_conditioning(family):
    with torch.no_grad():
        cond = family.encode_prompt(family.tokenize(CAPTIONS, 75), 0)
        noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([100, 700])
        rows = [[96, 64, 0, 16, 64, 64], [64, 64, 0, 0, 64, 64]]
        pred = family.predict(noisy, t, cond, size_batch(rows))
        manual = family.unet(noisy, t, encoder_hidden_states=cond.hidden_states, added_cond_kwargs={
            "text_embeds": cond.pooled, "time_ids": torch.tensor(rows, dtype=torch.float32)})
        other_size = family.predict(noisy, t, cond, size_batch([[1024, 1024, 0, 0, 1024, 1024]] * 2))
    torch.testing.assert_close(pred, manual)
    assert pred.shape == noisy.shape
    assert not torch.allclose(pred, other_size)


# -- settings -------------------------------------------------------------------------------------
def test_cached_text_encoder_outputs_mean_unet_only_with_a_note(tiny_sdxl_dir):
    cached, logs = load_family(tiny_sdxl_dir, sdxl_cache_text_encoder_outputs=True)
    assert [t.prefix for t in cached.lora_targets()] == ["lora_unet"]
    assert any("text encoders are not trained" in m for _, m in logs)
    cached.release_text_encoders()
    assert all(p.device.type == "cpu" for te in cached.text_encoders for p in te.parameters())
    assert [t.prefix for t in load_family(tiny_sdxl_dir)[0].lora_targets()] == ["lora_unet", "lora_te1", "lora_te2"]


def test_no_half_vae_keeps_the_vae_fp32_even_under_autocast(tiny_sdxl_dir):
    half, _ = load_family(tiny_sdxl_dir, torch.bfloat16, sdxl_no_half_vae=True)
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.float32
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = half.encode_images(pixels, torch.Generator().manual_seed(0))
    assert latents.dtype == torch.float32 and latents.shape == (1, 4, 8, 8)
    plain, _ = load_family(tiny_sdxl_dir, torch.bfloat16)
    assert plain.vae.dtype == torch.bfloat16
    assert half.fingerprint() != plain.fingerprint()  # cached latents of one are not reused by the other


# -- the file in diffusers -----------------------------------------------------------------------------
def test_diffusers_sdxl_pipeline_applies_every_module_exactly(family, tiny_sdxl_dir, tmp_path):
    """Each key lands on the very layer it was trained on: fused ΔW equals up @ down * alpha / rank."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    network = LoRANetwork.build(family.lora_targets(), NetworkSpec(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0))
    torch.manual_seed(0)
    for module in network.lora_modules():
        torch.nn.init.normal_(module.lora_up.weight, std=0.05)
    path = tmp_path / "sdxl_lora.safetensors"
    save_file(network.lora_state_dict(), str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    roots = {"lora_unet": (family.unet, pipe.unet), "lora_te1": (family.text_encoders[0], pipe.text_encoder),
             "lora_te2": (family.text_encoders[1], pipe.text_encoder_2)}
    paths = {prefix: {id(m): p for p, m in ours.named_modules()} for prefix, (ours, _) in roots.items()}
    layers = {}
    for module in network.lora_modules():
        prefix = next(p for p in roots if module.lora_name.startswith(p + "_"))
        layer = roots[prefix][1].get_submodule(paths[prefix][id(module.org_module)])
        layers[module.lora_name] = (module, layer, layer.weight.detach().clone())
    pipe.load_lora_weights(str(path), adapter_name="nekoya")
    pipe.fuse_lora(lora_scale=1.0)
    for name, (module, layer, before) in layers.items():
        torch.testing.assert_close(layer.weight.detach() - before, module.delta_weight(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert {k for k in network.lora_state_dict()} == {
        f"{n}.{part}" for n in layers for part in ("lora_down.weight", "lora_up.weight", "alpha")}
