"""The memory estimate: sensible figures per family, the effect of each setting, and the warning."""
from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from test_preflight_support import big_cpu, gpu, settings
from trainer.preflight import check
from trainer.preflight import device as device_module
from trainer.preflight.device import GIB, probe_device
from trainer.families import SPECS
from trainer.preflight.memory import estimate_memory
from trainer.settings import TrainingSettings


def gib(settings_, family="sd1", device=None):
    return estimate_memory(settings_, SPECS[family], device or gpu(24)).total_bytes / GIB


def test_public_reference_points_are_in_range():
    # SD1.5 LoRA at 512 px, batch 1, fp16, AdamW8bit, cached latents: about 4-7 GB on real cards.
    sd15 = TrainingSettings(max_resolution="512,512", mixed_precision="fp16", optimizer="AdamW8bit", network_dim=32)
    assert 3.5 < gib(sd15) < 7.5
    # SDXL at 1024 px, batch 1, bf16, Adafactor, no checkpointing: about 19 GB (sd-scripts #756).
    sdxl = TrainingSettings(sdxl=True, max_resolution="1024,1024", mixed_precision="bf16", optimizer="Adafactor", network_dim=32)
    assert 15 < gib(sdxl, "sdxl") < 24
    # ... and with gradient checkpointing and cached text-encoder outputs it fits a 12 GB card.
    low = sdxl.model_copy(update={"gradient_checkpointing": True, "sdxl_cache_text_encoder_outputs": True})
    assert gib(low, "sdxl") < 12
    # sd-scripts' train_SDXL-en: SDXL LoRA "can be done with 8GB GPU memory (10GB recommended)" with a low
    # dim, the U-Net only, gradient checkpointing, cached latents and text-encoder outputs, and Adafactor.
    eight = low.model_copy(update={"network_dim": 8, "network_alpha": 8, "text_encoder_lr": 0.0})
    assert 6 < gib(eight, "sdxl") < 8


# Tensor peaks of real training steps in the GPU's dtypes, measured by bench/memory_peak.py (bench/RESULTS.md,
# session 5): bf16, AdamW8bit, batch 1, LoRA dim 8, latents cached on first use.
MEASURED_PEAKS_MB = [
    ("sd1", {"max_resolution": "512,512", "gradient_checkpointing": True}, 2323),
    ("sd1", {"max_resolution": "512,512"}, 3296),
    ("sd1", {"max_resolution": "512,512", "mixed_precision": "no"}, 5938),
    ("sd1", {"max_resolution": "512,512", "train_batch_size": 2}, 4521),
    ("sd1", {"max_resolution": "512,512", "train_batch_size": 2, "gradient_checkpointing": True}, 2450),
    ("sd2", {"max_resolution": "768,768", "v2": True, "v_parameterization": True, "gradient_checkpointing": True}, 3088),
    ("sd2", {"max_resolution": "768,768", "v2": True, "v_parameterization": True}, 5214),
    ("sdxl", {"max_resolution": "1024,1024", "gradient_checkpointing": True}, 7889),
    ("sdxl", {"max_resolution": "1024,1024", "gradient_checkpointing": True, "text_encoder_lr": 0.0,
              "sdxl_cache_text_encoder_outputs": True}, 6282),
    ("sdxl", {"max_resolution": "1024,1024", "text_encoder_lr": 0.0, "sdxl_cache_text_encoder_outputs": True}, 13212),
]


@pytest.mark.parametrize(("family", "update", "peak_mb"), MEASURED_PEAKS_MB)
def test_the_estimate_is_a_little_above_the_measured_peaks(family, update, peak_mb):
    s = TrainingSettings(sdxl=family == "sdxl", mixed_precision="bf16", optimizer="AdamW8bit", network_dim=8,
                         network_alpha=8).model_copy(update=update)
    with_context = peak_mb / 1024 + 0.5  # nvidia-smi adds the CUDA context and the allocator's cache
    assert 1.0 < gib(s, family) / with_context < 1.3


def test_each_setting_moves_the_estimate_the_right_way():
    base = TrainingSettings(max_resolution="512,512", mixed_precision="fp16", optimizer="AdamW", cache_latents=True)
    more = {
        "train_batch_size": 2, "max_resolution": "768,768", "mixed_precision": "no", "network_dim": 128,
    }
    less = {"gradient_checkpointing": True, "optimizer": "AdamW8bit", "text_encoder_lr": 0}
    for key, value in more.items():
        assert gib(base.model_copy(update={key: value})) > gib(base), key
    for key, value in less.items():
        assert gib(base.model_copy(update={key: value})) < gib(base), key
    # "none" runs SDPA too (measured: the same peak as sdpa with and without checkpointing)
    assert gib(base.model_copy(update={"xformers": "none"})) == gib(base)
    assert gib(base, "sdxl") > gib(base, "sd2") > gib(base, "sd1")
    # latents are cached on first use, so the VAE is on the device during epoch 1 either way: caching
    # lowers the peak only where encoding a training batch would outgrow the step (never here)
    assert gib(base.model_copy(update={"cache_latents": False})) >= gib(base)


def test_text_encoders_leave_the_device_when_untrained_and_captions_never_change():
    trained = TrainingSettings(max_resolution="512,512", mixed_precision="bf16", unet_lr=1e-4, text_encoder_lr=1e-4)
    frozen = trained.model_copy(update={"text_encoder_lr": 0.0})
    shuffled = frozen.model_copy(update={"shuffle_caption": True})  # captions change: encoded every step
    te_bytes = SPECS["sd1"].text_encoder_params[0] * 2
    assert gib(frozen) < gib(shuffled) < gib(trained)
    assert gib(shuffled) - gib(frozen) == pytest.approx(te_bytes / GIB, rel=0.01)
    # SDXL with its cache setting, at 512 px with checkpointing: caching (the encoders on the device) is the peak
    sdxl = TrainingSettings(sdxl=True, max_resolution="512,512", mixed_precision="bf16", gradient_checkpointing=True,
                            sdxl_cache_text_encoder_outputs=True)
    parts = estimate_memory(sdxl, SPECS["sdxl"], gpu(24)).parts
    assert parts["activations or encoding"] == pytest.approx(sum(SPECS["sdxl"].text_encoder_params) * 2 * 1.1, rel=0.01)


def test_cpu_runs_in_fp32_and_locon_adds_conv_parameters():
    s = TrainingSettings(mixed_precision="fp16")
    cpu = estimate_memory(s, SPECS["sd1"], big_cpu())
    assert cpu.precision == "fp32" and cpu.total_bytes > estimate_memory(s, SPECS["sd1"], gpu(24)).total_bytes
    locon = s.model_copy(update={"LoRA_type": "Kohya LoCon", "conv_dim": 8})
    assert estimate_memory(locon, SPECS["sd1"], gpu(24)).trainable_params > cpu.trainable_params


def test_a_cpu_with_bf16_instructions_runs_bf16_and_counts_half_the_weights():
    bf16_cpu = replace(big_cpu(), native_bf16=True)
    s = TrainingSettings(mixed_precision="bf16")
    native, plain = (estimate_memory(s, SPECS["sd1"], cpu) for cpu in (bf16_cpu, big_cpu()))
    assert (native.precision, plain.precision) == ("bf16", "fp32")
    assert native.total_bytes < plain.total_bytes
    assert estimate_memory(TrainingSettings(mixed_precision="fp16"), SPECS["sd1"], bf16_cpu).precision == "fp32"


def test_cpu_bf16_detection_without_torch_agrees_with_torch(monkeypatch):
    import torch

    with_torch = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    device_module.cpu_has_native_bf16.cache_clear()
    monkeypatch.delitem(sys.modules, "torch")
    try:
        from_cpuinfo = device_module.cpu_has_native_bf16()
    finally:
        device_module.cpu_has_native_bf16.cache_clear()
    if Path("/proc/cpuinfo").exists():
        assert from_cpuinfo == with_torch


def test_lora_size_matches_a_real_dim_32_file():
    # A kohya dim-32 SD1.5 LoRA (UNet + text encoder) is about 37.9 MB in fp16.
    estimate = estimate_memory(TrainingSettings(network_dim=32), SPECS["sd1"], gpu(24))
    assert 36e6 < estimate.trainable_params * 2 < 40e6


def test_warning_when_the_run_does_not_fit_the_card(tmp_path, tiny_sdxl_file, monkeypatch):
    monkeypatch.setattr(device_module, "probe_device", lambda: gpu(8, "Small GPU"))
    s = settings(tmp_path, tiny_sdxl_file, sdxl=True, max_resolution="1024,1024", max_bucket_reso=2048,
                 mixed_precision="bf16", gradient_checkpointing=False)
    report = check(s)
    [warning] = [p for p in report.warnings if "Small GPU" in p.message]
    assert "8.0 GiB" in warning.message and "Gradient checkpointing" in warning.fix
    assert report.memory.exceeds_device and "Small GPU" in report.memory.describe()
    monkeypatch.setattr(device_module, "probe_device", lambda: gpu(80, "Big GPU"))
    assert not [p for p in check(s).warnings if "GiB" in p.message]


def test_warning_when_other_programs_use_the_memory(tmp_path, tiny_sd1_file, monkeypatch):
    busy = device_module.DeviceInfo("cuda", "Busy GPU", 24 * GIB, 1 * GIB, "test")
    monkeypatch.setattr(device_module, "probe_device", lambda: busy)
    report = check(settings(tmp_path, tiny_sd1_file, max_resolution="512,512", max_bucket_reso=1024))
    assert any("only 1.0 GiB is free" in p.message for p in report.warnings)


def test_probe_device_without_gpu_reports_system_memory():
    info = probe_device()
    if info.kind == "cpu":
        import psutil

        assert info.total_bytes == psutil.virtual_memory().total
    assert info.describe()


def test_probe_uses_a_cpu_torch_build_without_importing_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(device_module, "_torch_is_cpu_build", lambda: True)
    assert probe_device().kind == "cpu" and "torch" not in sys.modules


@pytest.mark.parametrize("family", sorted(SPECS))
def test_family_figures_are_consistent(family):
    traits = SPECS[family]
    assert traits.unet_params > 8e8 and traits.vae_params > 8e7
    assert traits.unet_lora_per_rank > traits.text_encoder_lora_per_rank / 2


# ---- the base model's size comes from its file ----------------------------------------------------

def _header_only_safetensors(path: Path, tensors: dict[str, int]) -> Path:
    """A .safetensors file of fp16 vectors with these element counts, sparse: the header is real, the data zeros."""
    import json
    import struct

    header, offset = {}, 0
    for key, count in tensors.items():
        header[key] = {"dtype": "F16", "shape": [count], "data_offsets": [offset, offset + 2 * count]}
        offset += 2 * count
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


SD1_NOMINAL = SPECS["sd1"]


def test_a_tiny_model_is_estimated_by_its_own_weights(tmp_path, tiny_sd1_file, monkeypatch):
    from app.checks import check_settings
    from trainer.checkpoints.integrity import read_safetensors_header

    monkeypatch.setattr(device_module, "probe_device", big_cpu)
    s = settings(tmp_path, tiny_sd1_file, mixed_precision="no", text_encoder_lr=1e-4)
    shapes = read_safetensors_header(tiny_sd1_file).shapes
    weights = sum(math.prod(shape) for key, shape in shapes.items()
                  if key.startswith(("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")))
    report = check(s)
    assert report.memory.parts["base model"] == weights * 4  # fp32 on this CPU
    nominal = SD1_NOMINAL.unet_params + sum(SD1_NOMINAL.text_encoder_params) + SD1_NOMINAL.vae_params
    assert weights < nominal / 100
    assert f"base model: {weights / 1e6:,.1f} M parameters, counted from tiny_sd1.safetensors's header" in report.memory.describe()
    assert "counted from tiny_sd1.safetensors's header" in check_settings(s).memory  # the GUI's plan panel text


def test_a_file_of_the_real_size_gives_the_nominal_estimate(tmp_path):
    nominal = TrainingSettings(mixed_precision="fp16", pretrained_model_name_or_path=str(tmp_path / "missing.safetensors"))
    real = _header_only_safetensors(tmp_path / "sd15-pruned-fp16.safetensors", {
        "model.diffusion_model.w": SD1_NOMINAL.unet_params,
        "cond_stage_model.transformer.text_model.w": SD1_NOMINAL.text_encoder_params[0],
        "first_stage_model.w": SD1_NOMINAL.vae_params,
        "model_ema.w": 10**6,  # EMA copies are not loaded for training, so they do not count
    })
    folder = tmp_path / "diffusers"
    for component, count in (("unet", SD1_NOMINAL.unet_params), ("text_encoder", SD1_NOMINAL.text_encoder_params[0]),
                             ("vae", SD1_NOMINAL.vae_params)):
        (folder / component).mkdir(parents=True)
        _header_only_safetensors(folder / component / "model.safetensors", {"w": count})
    expected = estimate_memory(nominal, SD1_NOMINAL, gpu(24))
    assert "nominal size (the model file could not be found)" in expected.describe()
    for model in (real, folder):
        estimate = estimate_memory(nominal.model_copy(update={"pretrained_model_name_or_path": str(model)}), SD1_NOMINAL, gpu(24))
        assert estimate.parts == expected.parts, model
        assert "1,066.2 M parameters, counted from" in estimate.describe()


def test_a_ckpt_keeps_the_nominal_size_and_says_so(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not opened for the estimate")
    s = TrainingSettings(mixed_precision="fp16", pretrained_model_name_or_path=str(ckpt))
    estimate = estimate_memory(s, SD1_NOMINAL, gpu(24))
    assert estimate.parts["base model"] == (SD1_NOMINAL.unet_params + SD1_NOMINAL.text_encoder_params[0] + SD1_NOMINAL.vae_params) * 2
    assert "base model: Stable Diffusion 1.x's nominal size (.ckpt files are not opened to count their weights" in estimate.describe()
