"""SD3 text-encoder dropout: kohya_ss's CLIP-L / CLIP-G / T5 dropout rates, applied as sd-scripts'
``Sd3TextEncodingStrategy`` does.

sd-scripts draws, for each sample of a training batch, whether CLIP-L, CLIP-G and T5-XXL are dropped
(``random.random() < rate``, only for a rate above 0); a dropped encoder's output is zeros: CLIP-L's hidden states
(the first 768 channels of the CLIP tokens) and its pooled half, CLIP-G's (the next 1280 channels) and its pooled
half, or all of T5's tokens (``encode_tokens`` fills zeros for the members it skips; with cached outputs
``drop_cached_text_encoder_outputs`` zeroes the same slices in ``on_step_start``). Sample prompts are not dropped
here (sd-scripts' full trainer encodes them with ``enable_dropout=False``).

Nekoya draws each sample's three decisions from a generator seeded by the sample's row key (with its own suffix,
so the decision is not the noise draw): a sample is dropped or kept the same whatever process or batch position
trains it, and a resumed run drops what the uninterrupted run would.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from trainer.noise_sampling import row_generator

DROPOUT_KEY_SUFFIX = "/te-dropout"
DROPOUT_SETTINGS = ("sd3_clip_l_dropout_rate", "clip_g_dropout_rate", "sd3_t5_dropout_rate")  # CLIP-L, CLIP-G, T5


def dropout_rates(settings: Any) -> tuple[float, float, float]:
    """(CLIP-L, CLIP-G, T5) rates from the settings (kohya_ss's keys; a missing or empty one is 0)."""
    return tuple(float(getattr(settings, key, 0.0) or 0.0) for key in DROPOUT_SETTINGS)  # type: ignore[return-value]


def dropped_encoders(row_keys: Sequence[str], rates: Sequence[float]) -> torch.Tensor:
    """(B, 3) bool: whether each sample drops CLIP-L, CLIP-G and T5. Three uniforms per sample from its row key's
    generator, so an encoder's decision does not depend on the other rates; a rate of 0 never drops."""
    rate = torch.tensor([float(r) for r in rates], dtype=torch.float64)
    rows = [torch.rand(3, generator=row_generator(key + DROPOUT_KEY_SUFFIX), dtype=torch.float64) for key in row_keys]
    if not rows:
        return torch.zeros(0, 3, dtype=torch.bool)
    return (torch.stack(rows) < rate) & (rate > 0)


def drop_conditioning(context: torch.Tensor, pooled: torch.Tensor, drops: torch.Tensor, clip_tokens: int,
                      widths: tuple[int, int], pooled_l: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the dropped encoders' parts of (B, clip_tokens + T5 tokens, W) ``context`` and (B, P) ``pooled``:
    CLIP-L's ``widths[0]`` channels of the CLIP tokens and pooled[:pooled_l], CLIP-G's next ``widths[1]`` channels
    and pooled[pooled_l:], T5's tokens. Not in place (cached outputs stay as they are); a kept sample's gradients
    flow as before, a dropped part gets none."""
    if not bool(drops.any()):
        return context, pooled
    drops = drops.to(context.device)
    drop_l, drop_g, drop_t5 = drops[:, 0], drops[:, 1], drops[:, 2]
    tokens = torch.arange(context.shape[1], device=context.device) < clip_tokens
    channels = torch.arange(context.shape[2], device=context.device)
    chan_l, chan_g = channels < widths[0], (channels >= widths[0]) & (channels < widths[0] + widths[1])
    clip_part = tokens[None, :, None]
    zero = ((drop_l[:, None, None] & clip_part & chan_l[None, None, :])
            | (drop_g[:, None, None] & clip_part & chan_g[None, None, :])
            | (drop_t5[:, None, None] & ~clip_part))
    pooled_is_l = torch.arange(pooled.shape[1], device=pooled.device) < pooled_l
    zero_pooled = (drop_l.to(pooled.device)[:, None] & pooled_is_l[None]) | (
        drop_g.to(pooled.device)[:, None] & ~pooled_is_l[None])
    return context.masked_fill(zero, 0), pooled.masked_fill(zero_pooled, 0)
