"""What to change when a run needs more memory than the device has: for the preflight warning
and for an out-of-memory stop.

Each rule says when it applies, the settings it changes and how to say it. The suggestions are
ordered by what each change saves in the memory estimate (``memory.py``) for these settings, and
say how much, so the user sees which one is worth its cost (a slower step, a frozen text encoder).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from trainer.preflight.device import GIB, DeviceInfo
from trainer.families import spec_for_settings
from trainer.optim.table import optimizer_facts

# the advice after an out-of-memory stop is about the device that ran out: rank for a typical GPU
TYPICAL_GPU = DeviceInfo("cuda", "GPU", None, None, "assumed")
SHOWN_SAVING_GIB = 0.05  # smaller savings are listed without a figure


@dataclass(frozen=True)
class MemoryRule:
    applies: Callable[[Any], bool]
    change: Callable[[Any], dict]  # settings update that saves memory
    advice: Callable[[Any], str]


def _lower_side(side: int) -> int:
    return max(256, (side * 3 // 4) // 64 * 64)


def _trains_text_encoders(settings) -> bool:
    from trainer.preflight.memory import text_encoder_outputs_cached

    return settings.train_lrs()[1] > 0 and not text_encoder_outputs_cached(settings, spec_for_settings(settings))


def _freeze_text_encoders(settings) -> dict:
    cache_setting = spec_for_settings(settings).te_output_cache_setting
    if cache_setting:
        return {cache_setting: True}
    unet_lr, _ = settings.train_lrs()
    return {"text_encoder_lr": 0.0, "unet_lr": unet_lr}  # both 0 would mean "the Learning rate for both"


def _freeze_advice(settings) -> str:
    if spec_for_settings(settings).te_output_cache_setting:
        return "tick Cache text encoder outputs (the text encoders are then not trained)"
    return "set Text Encoder learning rate to 0 (trains the U-Net only and caches the text encoder's outputs)"


def _resolution(settings) -> str:
    side = _lower_side(max(settings.resolution))
    return f"{side},{side}"


RULES: tuple[MemoryRule, ...] = (
    MemoryRule(lambda s: s.train_batch_size > 1,
               lambda s: {"train_batch_size": max(1, s.train_batch_size // 2)},
               lambda s: f"lower Train batch size from {s.train_batch_size} to {max(1, s.train_batch_size // 2)} "
                         f"(raise Gradient accumulate steps to {s.gradient_accumulation_steps * 2} "
                         "to keep the same effective batch)"),
    MemoryRule(lambda s: not s.gradient_checkpointing,
               lambda s: {"gradient_checkpointing": True},
               lambda s: "tick Gradient checkpointing (about 20 % slower steps)"),
    MemoryRule(lambda s: not s.cache_latents or s.color_aug or s.random_crop,
               lambda s: {"cache_latents": True, "color_aug": False, "random_crop": False},
               lambda s: "tick Cache latents" + (" (and untick Color augmentation / Random crop, which prevent it)"
                                                 if s.color_aug or s.random_crop else "")),
    MemoryRule(lambda s: optimizer_facts(s.optimizer).state_bytes > optimizer_facts("AdamW8bit").state_bytes,
               lambda s: {"optimizer": "AdamW8bit"},
               lambda s: f"use the AdamW8bit optimizer instead of {s.optimizer} (its state takes a quarter of the memory)"),
    MemoryRule(lambda s: s.mixed_precision == "no",
               lambda s: {"mixed_precision": "bf16"},
               lambda s: "set Mixed precision to bf16 (or fp16 on older GPUs)"),
    MemoryRule(lambda s: max(s.resolution) > spec_for_settings(s).native_resolution * 3 // 4,
               lambda s: {"max_resolution": _resolution(s)},
               lambda s: f"lower Max resolution from {s.max_resolution} to {_resolution(s)}"),
    MemoryRule(_trains_text_encoders, _freeze_text_encoders, _freeze_advice),
    MemoryRule(lambda s: s.network_dim > 32,
               lambda s: {"network_dim": 32},
               lambda s: f"lower Network Rank from {s.network_dim} to 32"),
)


def memory_suggestions(settings, device: DeviceInfo | None = None) -> list[str]:
    """What to change to use less memory, for these settings, most saving first (ties keep the rules' order)."""
    from trainer.preflight.memory import estimate_memory

    device = device or TYPICAL_GPU
    family = spec_for_settings(settings)
    now = estimate_memory(settings, family, device).total_bytes
    ranked = []
    for order, rule in enumerate(RULES):
        if not rule.applies(settings):
            continue
        changed = settings.model_copy(update=rule.change(settings))
        saving = (now - estimate_memory(changed, family, device).total_bytes) / GIB
        text = rule.advice(settings)
        if saving >= SHOWN_SAVING_GIB:
            text += f", saving about {saving:.1f} GiB"
        ranked.append((-round(saving, 1), order, text))
    return [text for _, _, text in sorted(ranked)]


def memory_advice(settings, device: DeviceInfo | None = None, *, short: bool = False) -> str:
    """What to change, numbered, most saving first; ``short`` gives the top 3 on one line."""
    suggestions = memory_suggestions(settings, device)
    if not suggestions:
        return "every memory-saving setting is already on; use a GPU with more memory, or a smaller model"
    if short:
        return "; ".join(suggestions[:3])
    numbered = "\n".join(f"  {i}. {text}" for i, text in enumerate(suggestions, 1))
    return f"To use less memory, change (most saving first):\n{numbered}"
