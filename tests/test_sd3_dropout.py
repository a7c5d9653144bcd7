"""SD3's CLIP-L / CLIP-G / T5 dropout rates (sd-scripts' Sd3TextEncodingStrategy): a dropped encoder's part of the
conditioning (hidden states and pooled half) is zeros, a rate of 0 changes nothing, decisions are per sample and
come from the sample's row key (the same wherever a split batch puts it), and a run with the rates set trains."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sd3_support import tiny_sd3_dir  # noqa: F401  (fixture)
from test_train import images  # noqa: F401  (fixture)
from trainer.families.sd3 import CLIP_TOKENS, SD3Family
from trainer.families.sd3_dropout import DROPOUT_SETTINGS, drop_conditioning, dropped_encoders

KEYS = [f"42/1/{batch}/{position}" for batch in range(3) for position in range(4)]


def _family(model, rates=(0.0, 0.0, 0.0)) -> SD3Family:
    values = {"pretrained_model_name_or_path": str(model), "sd3_clip_l": "", "clip_g": "", "sd3_t5xxl": "", "vae": "",
              "weighting_scheme": "logit_normal", "logit_mean": 0, "logit_std": 1, "mode_scale": 1.29,
              "sd3_cache_text_encoder_outputs": False, **dict(zip(DROPOUT_SETTINGS, rates))}
    settings = SimpleNamespace(**values)
    family = SD3Family(settings)
    family.load(settings, torch.float32, torch.device("cpu"), lambda *_: None)
    return family


@pytest.fixture(scope="module")
def encoded(tiny_sd3_dir):
    family = _family(tiny_sd3_dir)
    with torch.no_grad():
        cond = family.encode_prompt(family.tokenize(["a photo of sks dog", "a cat", "a red car", "sks dog on grass"]))
    l_cfg, g_cfg = family.text_encoders[0].config, family.text_encoders[1].config
    return cond, (l_cfg.hidden_size, g_cfg.hidden_size), l_cfg.projection_dim


def _parts(cond, widths, pooled_l):
    """Each encoder's part of the conditioning, as sd-scripts lays it out: (CLIP-L, CLIP-G, T5)."""
    ctx, pooled = cond.context, cond.pooled
    lw, gw = widths
    return ((ctx[:, :CLIP_TOKENS, :lw], pooled[:, :pooled_l]), (ctx[:, :CLIP_TOKENS, lw:lw + gw], pooled[:, pooled_l:]),
            (ctx[:, CLIP_TOKENS:],))


@pytest.mark.parametrize("dropped", [0, 1, 2])
def test_a_rate_of_one_zeroes_that_encoders_part_and_keeps_the_others(tiny_sd3_dir, encoded, dropped):
    cond, widths, pooled_l = encoded
    rates = [0.0, 0.0, 0.0]
    rates[dropped] = 1.0
    family = _family(tiny_sd3_dir, rates)
    out = family.drop_text_encoders(cond, KEYS[:4])
    for index, (before, after) in enumerate(zip(_parts(cond, widths, pooled_l), _parts(out, widths, pooled_l))):
        for b, a in zip(before, after):
            if index == dropped:
                assert not a.any() and b.abs().sum() > 0
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    # CLIP's zero padding up to T5's width stays zero
    assert not out.context[:, :CLIP_TOKENS, sum(widths):].any()


def test_a_rate_of_zero_changes_nothing_and_a_batch_without_row_keys_is_not_dropped(tiny_sd3_dir, encoded):
    cond = encoded[0]
    assert _family(tiny_sd3_dir).drop_text_encoders(cond, KEYS[:4]) is cond
    family = _family(tiny_sd3_dir, (1.0, 1.0, 1.0))
    assert family.drop_text_encoders(cond, ()) is cond  # sample images and inference pass no training batch
    x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    with torch.no_grad():
        plain = _family(tiny_sd3_dir).predict(x, t, cond, SimpleNamespace(row_keys=KEYS[:4]))
        assert torch.equal(family.predict(x, t, cond, None), plain)
        dropped = family.predict(x, t, cond, SimpleNamespace(row_keys=KEYS[:4]))
        zeros = type(cond)(torch.zeros_like(cond.context), torch.zeros_like(cond.pooled))
        assert torch.equal(dropped, family.predict(x, t, zeros, None))  # every encoder dropped: all-zero conditioning


def test_a_rate_of_one_half_drops_about_half_of_the_samples_independently():
    keys = [f"7/{epoch}/{batch}/0" for epoch in range(1, 41) for batch in range(100)]
    drops = dropped_encoders(keys, (0.5, 0.5, 0.5)).float()
    assert drops.shape == (4000, 3)
    assert torch.all((drops.mean(0) - 0.5).abs() < 0.03), drops.mean(0)
    both = (drops[:, 0] * drops[:, 1]).mean()  # CLIP-L's and CLIP-G's decisions are independent draws
    assert abs(float(both) - 0.25) < 0.03
    only_t5 = dropped_encoders(keys, (0.0, 0.0, 0.3))
    assert not only_t5[:, :2].any() and abs(float(only_t5[:, 2].float().mean()) - 0.3) < 0.03
    # the T5 decision is the same draw whatever the other rates are
    assert torch.equal(only_t5[:, 2], dropped_encoders(keys, (0.9, 0.1, 0.3))[:, 2])


def test_the_decision_is_the_samples_whatever_its_place_in_a_split_batch(encoded):
    cond, widths, pooled_l = encoded
    rates = (0.5, 0.5, 0.5)
    keys = KEYS[4:8]
    whole = dropped_encoders(keys, rates)
    assert torch.equal(torch.cat([dropped_encoders(keys[:2], rates), dropped_encoders(keys[2:], rates)]), whole)
    assert torch.equal(dropped_encoders(keys[::-1], rates), whole.flip(0))
    # the conditioning of a process's half is the whole batch's rows
    ctx, pooled = drop_conditioning(cond.context, cond.pooled, whole, CLIP_TOKENS, widths, pooled_l)
    half_ctx, half_pooled = drop_conditioning(cond.context[2:], cond.pooled[2:], dropped_encoders(keys[2:], rates),
                                              CLIP_TOKENS, widths, pooled_l)
    assert torch.equal(half_ctx, ctx[2:]) and torch.equal(half_pooled, pooled[2:])
    # not the noise draw's generator: a key's dropout uniforms are not its noise generator's first numbers
    from trainer.noise_sampling import row_generator

    assert not torch.equal(torch.rand(3, generator=row_generator(keys[0]), dtype=torch.float64),
                           torch.rand(3, generator=row_generator(keys[0] + "/te-dropout"), dtype=torch.float64))


def test_dropout_keeps_gradients_of_the_kept_parts_only(encoded):
    cond, widths, pooled_l = encoded
    context = cond.context.clone().requires_grad_(True)
    drops = torch.tensor([[True, False, False], [False, False, True], [False, False, False], [True, True, True]])
    out_ctx, _ = drop_conditioning(context, cond.pooled, drops, CLIP_TOKENS, widths, pooled_l)
    out_ctx.sum().backward()
    grad = context.grad
    assert not grad[0, :CLIP_TOKENS, :widths[0]].any() and grad[0, CLIP_TOKENS:].eq(1).all()
    assert not grad[1, CLIP_TOKENS:].any() and grad[1, :CLIP_TOKENS].eq(1).all()
    assert grad[2].eq(1).all() and not grad[3, CLIP_TOKENS:].any()


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True])
def test_a_two_step_run_with_the_rates_set_trains(tiny_sd3_dir, images, tmp_path, cached):
    from test_sd3_train import sd3_settings
    from trainer.loop import train
    from trainer.preflight import check

    extra = {"sd3_cache_text_encoder_outputs": True, "text_encoder_lr": 0} if cached else {}
    settings = sd3_settings(tiny_sd3_dir, images, tmp_path / "out", sd3_clip_l_dropout_rate=0.5,
                            clip_g_dropout_rate=0.5, sd3_t5_dropout_rate=1.0, train_batch_size=2, **extra)
    named = {p.field for p in check(settings, deep=False).problems}
    assert not named & set(DROPOUT_SETTINGS), named  # applied: the check no longer says they are not
    result = train(settings)
    assert result.status == "finished" and result.step == 2, result.error
    assert (tmp_path / "out" / "tiny.safetensors").is_file()
