"""The lean VAE (trainer.models.vae) against diffusers' AutoencoderKL: same keys, same numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import diffusers  # the reference: a missing diffusers fails these tests (it is pinned in the test extra)
import pytest
import torch

from trainer.devtools.tiny_specs import TINY_VAE
from trainer.models.vae import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "trainer" / "checkpoints" / "configs"
MID_VAE = {**TINY_VAE, "block_out_channels": [32, 64, 64, 64], "layers_per_block": 2}
LEAN_VAE = {**TINY_VAE, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False,
            "latent_channels": 16, "in_channels": 4, "out_channels": 2}


def _shipped(name: str) -> dict:
    return json.loads((CONFIGS / name / "vae" / "config.json").read_text())


def _shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _pair(config: dict, seed: int = 0) -> tuple[AutoencoderKL, torch.nn.Module]:
    """Our VAE and diffusers', same random weights; weights perturbed so norms/biases are not trivial."""
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL.from_config(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = AutoencoderKL.from_config(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal within float32 noise, relative to the largest magnitude (measured: encode exact, decode ~2e-6)."""
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rtol * scale + 1e-7, (err, scale)


@pytest.mark.parametrize("config", [TINY_VAE, MID_VAE, LEAN_VAE, _shipped("sd15"), _shipped("sd21"),
                                    _shipped("sdxl_base")], ids=["tiny", "mid", "lean", "sd15", "sd21", "sdxl"])
def test_state_dict_keys_and_shapes_match_diffusers(config):
    with torch.device("meta"):
        ours, ref = AutoencoderKL.from_config(config), diffusers.AutoencoderKL.from_config(config)
    assert _shapes(ours) == _shapes(ref)


def test_config_namespace_defaults_and_properties():
    vae = AutoencoderKL.from_config({**_shipped("sdxl_base"), "block_out_channels": [32, 32]} | {
        "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2})
    assert vae.config.scaling_factor == 0.13025 and vae.config.force_upcast is True
    assert vae.config.latent_channels == 4 and vae.config.shift_factor is None
    assert vae.config._class_name == "AutoencoderKL"
    assert vae.dtype == torch.float32 and vae.device.type == "cpu"
    assert AutoencoderKL(**TINY_VAE).config.block_out_channels == TINY_VAE["block_out_channels"]


@pytest.mark.parametrize("bad", [
    {"down_block_types": ["AttnDownEncoderBlock2D"] * 4},
    {"up_block_types": ["UpDecoderBlock2D"] * 3},
    {"act_fn": "gelu"},
])
def test_unsupported_config_raises(bad):
    with pytest.raises(ValueError, match="VAE config"):
        AutoencoderKL.from_config({**TINY_VAE, **bad})


@pytest.mark.slow
@pytest.mark.parametrize("config,size", [(TINY_VAE, 32), (MID_VAE, 64), (LEAN_VAE, 32)], ids=["tiny", "mid", "lean"])
def test_encode_decode_match_diffusers(config, size):
    ours, ref = _pair(config)
    torch.manual_seed(1)
    pixels = torch.rand(2, ours.config.in_channels, size, size) * 2 - 1
    with torch.no_grad():
        a, b = ours.encode(pixels).latent_dist, ref.encode(pixels).latent_dist
        for name in ("mean", "std", "logvar", "var"):
            _close(getattr(a, name), getattr(b, name))
        _close(a.mode(), b.mode())
        sa = a.sample(generator=torch.Generator("cpu").manual_seed(7))
        sb = b.sample(generator=torch.Generator("cpu").manual_seed(7))
        _close(sa, sb)
        torch.manual_seed(3)
        na = a.sample()
        torch.manual_seed(3)
        _close(na, b.sample())
        _close(ours.decode(sa).sample, ref.decode(sa).sample)
        _close(ours(pixels).sample, ref(pixels).sample)


def test_logvar_clamped_like_diffusers():
    params = torch.randn(1, 8, 4, 4) * 50
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as Ref
    from trainer.models.vae import DiagonalGaussianDistribution as Ours
    a, b = Ours(params), Ref(params)
    assert torch.equal(a.logvar, b.logvar) and torch.equal(a.std, b.std)


def test_channels_last_gives_the_same_result():
    ours, ref = _pair(MID_VAE)
    torch.manual_seed(2)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        mean, dec = ours.encode(pixels).latent_dist.mean, ours.decode(latents).sample
        ours.to(memory_format=torch.channels_last)
        ref.to(memory_format=torch.channels_last)
        cl = pixels.contiguous(memory_format=torch.channels_last)
        cl_mean = ours.encode(cl).latent_dist.mean
        cl_dec = ours.decode(latents.contiguous(memory_format=torch.channels_last)).sample
        _close(cl_mean, mean)
        _close(cl_dec, dec)
        _close(cl_mean, ref.encode(cl).latent_dist.mean)


def test_input_gradients_match_diffusers():
    ours, ref = _pair(TINY_VAE)
    torch.manual_seed(4)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = torch.randn(1, 4, 4, 4)
    grads = []
    for model in (ours, ref):
        x, z = pixels.clone().requires_grad_(), latents.clone().requires_grad_()
        dist = model.encode(x).latent_dist
        loss = (dist.sample(generator=torch.Generator().manual_seed(0)) ** 2).sum() + dist.logvar.sum()
        loss = loss + (model.decode(z).sample ** 2).sum()
        loss.backward()
        grads.append((x.grad, z.grad))
    _close(grads[0][0], grads[1][0])
    _close(grads[0][1], grads[1][1])


def test_bf16_autocast_runs_close_to_diffusers():
    ours, ref = _pair(TINY_VAE)
    ours.to(memory_format=torch.channels_last)
    pixels = (torch.rand(1, 3, 32, 32) * 2 - 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours.encode(pixels).latent_dist.mean, ref.encode(pixels).latent_dist.mean
        da, db = ours.decode(a).sample, ref.decode(a).sample
    assert torch.isfinite(a).all() and torch.isfinite(da).all()
    assert (a.float() - b.float()).abs().max() <= 0.05 * b.float().abs().max()
    assert (da.float() - db.float()).abs().max() <= 0.05 * db.float().abs().max()


def test_half_weights_match_diffusers_half():
    ours, ref = _pair(TINY_VAE)
    ours.to(dtype=torch.bfloat16)
    ref.to(dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    pixels = (torch.rand(1, 3, 32, 32) * 2 - 1).to(torch.bfloat16)
    with torch.no_grad():
        a, b = ours.encode(pixels).latent_dist, ref.encode(pixels).latent_dist
        sa = a.sample(generator=torch.Generator().manual_seed(5))
        assert sa.dtype == torch.bfloat16
        _close(sa.float(), b.sample(generator=torch.Generator().manual_seed(5)).float(), rtol=2e-2)
        _close(ours.decode(sa).sample.float(), ref.decode(sa).sample.float(), rtol=2e-2)


@pytest.mark.slow
def test_module_imports_no_model_library():
    code = ("import sys, trainer.models.vae; "
            "bad = [m for m in ('diffusers', 'transformers', 'peft', 'accelerate', 'huggingface_hub') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
