"""What to change to use less memory: only what is not done yet, most saving first, with the saving."""
from __future__ import annotations

import re

import pytest

from test_preflight_support import gpu
from trainer.preflight.device import GIB, DeviceInfo
from trainer.families import spec_for_settings
from trainer.preflight.memory import estimate_memory
from trainer.preflight.memory_advice import RULES, memory_advice, memory_suggestions
from trainer.settings import TrainingSettings

HEAVY = TrainingSettings(train_batch_size=4, gradient_checkpointing=False, cache_latents=False, optimizer="AdamW",
                         sdxl=True, max_resolution="1024,1024", network_dim=128)
LIGHT = TrainingSettings(train_batch_size=1, gradient_checkpointing=True, cache_latents=True, optimizer="AdamW8bit",
                         max_resolution="512,512", network_dim=16)


def savings(suggestions: list[str]) -> list[float]:
    return [float(m.group(1)) for text in suggestions if (m := re.search(r"saving about ([0-9.]+) GiB", text))]


def test_only_what_is_not_done_yet_is_suggested_most_saving_first():
    advice = memory_advice(HEAVY)
    for text in ("Train batch size from 4 to 2", "Gradient accumulate steps to 2", "Gradient checkpointing",
                 "Cache latents", "AdamW8bit", "Max resolution from 1024,1024 to 768,768",
                 "Cache text encoder outputs", "Network Rank from 128"):
        assert text in advice, text
    figures = savings(memory_suggestions(HEAVY))
    assert len(figures) >= 6 and figures == sorted(figures, reverse=True)
    # SDXL at 1024 px without checkpointing: its activations are the biggest part by far
    assert advice.index("Gradient checkpointing") < advice.index("batch size") < advice.index("AdamW8bit")
    text = memory_advice(LIGHT)
    assert "Gradient checkpointing" not in text and "batch size" not in text and "AdamW8bit" not in text
    assert "1. set Text Encoder learning rate to 0" in text and "2. lower Max resolution from 512,512 to 384,384" in text
    done = LIGHT.model_copy(update={"max_resolution": "384,384", "text_encoder_lr": 0.0, "unet_lr": 1e-4})
    assert "every memory-saving setting is already on" in memory_advice(done)
    assert "Random crop" in memory_advice(TrainingSettings(cache_latents=True, random_crop=True, gradient_checkpointing=True))


def test_each_stated_saving_is_what_the_estimate_says_for_the_change():
    device = gpu(24)
    family = spec_for_settings(HEAVY)
    now = estimate_memory(HEAVY, family, device).total_bytes
    for rule in RULES:
        if rule.applies(HEAVY):
            changed = HEAVY.model_copy(update=rule.change(HEAVY))
            saved = (now - estimate_memory(changed, family, device).total_bytes) / GIB
            line = next(t for t in memory_suggestions(HEAVY, device) if t.startswith(rule.advice(HEAVY)))
            if saved >= 0.05:
                assert f"saving about {saved:.1f} GiB" in line
            else:
                assert "saving" not in line


def test_the_saving_depends_on_the_device():
    fp32 = LIGHT.model_copy(update={"mixed_precision": "no"})
    on_gpu = next(t for t in memory_suggestions(fp32, gpu(24)) if "Mixed precision" in t)
    plain_cpu = DeviceInfo("cpu", "CPU", 64 * GIB, 64 * GIB, "test", native_bf16=False)
    on_cpu = next(t for t in memory_suggestions(fp32, plain_cpu) if "Mixed precision" in t)
    assert "saving about" in on_gpu and "saving" not in on_cpu  # such a CPU trains in fp32 either way


@pytest.mark.parametrize("settings", [HEAVY, TrainingSettings(train_batch_size=2)])
def test_short_advice_is_one_line_of_three(settings):
    short = memory_advice(settings, short=True)
    assert "\n" not in short and short.count(";") <= 2
