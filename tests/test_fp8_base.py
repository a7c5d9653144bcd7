"""fp8_base: on a GPU with mixed precision the frozen UNet and text encoders are stored in float8 (sd-scripts);
on a CPU, or without mixed precision, the check says so and the weights stay as they were."""
from __future__ import annotations

import pytest
import torch

from test_train import tiny_settings
from trainer.optim.rules import decide_precision
from trainer.settings import TrainingSettings


def test_fp8_base_is_a_gpu_and_mixed_precision_choice():
    s = TrainingSettings(fp8_base=True, mixed_precision="bf16")
    assert decide_precision(s, "cuda", gpu_bf16=True).fp8_base
    cpu = decide_precision(s, "cpu", native_bf16=True)
    assert not cpu.fp8_base and any(n.field == "fp8_base" and "NVIDIA GPU" in n.message for n in cpu.notes)
    fp32 = decide_precision(TrainingSettings(fp8_base=True, mixed_precision="no"), "cuda")
    assert not fp32.fp8_base and any("Mixed precision fp16 or bf16" in n.message for n in fp32.notes)
    assert not decide_precision(TrainingSettings(mixed_precision="bf16"), "cuda").fp8_base


def test_fp8_storage_keeps_the_models_working_under_autocast(tiny_sd1_dir, tmp_path):
    """The same code path a GPU run takes, on the CPU's bf16 autocast: fp8 weights are cast per op."""
    from trainer.families.registry import create_family
    from trainer.fp8 import FP8, store_frozen_weights_in_fp8

    settings = tiny_settings(tiny_sd1_dir, tmp_path, tmp_path / "out")
    family = create_family(settings)
    family.load(settings, torch.bfloat16, torch.device("cpu"), lambda *a, **k: None)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    tokens = family.tokenize(["a photo of sks dog"], 75)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = family.unet(latents, torch.tensor([500]), family.encode_prompt(tokens, 1)).float()
    saved = store_frozen_weights_in_fp8(family, torch.bfloat16)
    assert saved > 0
    linear = [m for m in family.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert all(m.weight.dtype == FP8 for m in linear)
    embeddings = [m for m in family.text_encoders[0].modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and all(m.weight.dtype == torch.bfloat16 for m in embeddings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = family.unet(latents, torch.tensor([500]), family.encode_prompt(tokens, 1)).float()
    assert torch.isfinite(after).all()
    assert (after - before).abs().mean() < 0.25 * before.abs().mean()  # fp8 rounding, not a different model
