"""SD3's scaled position embeddings (sd3_enable_scaled_pos_embed) and random position-table crops
(pos_emb_random_crop_rate), as sd-scripts' MMDiT: which table an input takes, what the scaled table holds, where a
sample is cropped (per sample from its row key), and a run with both set trains and samples."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sd3_support import tiny_sd3_dir  # noqa: F401  (fixture)
from test_train import images  # noqa: F401  (fixture)
from trainer.families.sd3 import SD3Family
from trainer.families.sd3_pos_embed import (ScaledPositions, crop_offsets, latent_sizes, scaled_sincos_table,
                                            sincos_1d)

KEYS = [f"5/{epoch}/{batch}/{position}" for epoch in range(1, 11) for batch in range(50) for position in range(2)]


def test_a_scaled_table_puts_every_resolution_on_the_same_16_units():
    dim, size = 32, 8
    grid = int(size * 1.5)
    table = scaled_sincos_table(dim, grid, size).reshape(grid, grid, dim)
    coords = (torch.arange(grid, dtype=torch.float64) - (grid - size) / 2) * 16 / size  # the image spans 0..16
    torch.testing.assert_close(table[3, :, : dim // 2], sincos_1d(dim // 2, coords).float(), atol=1e-5, rtol=0)  # columns
    torch.testing.assert_close(table[:, 5, dim // 2:], sincos_1d(dim // 2, coords).float(), atol=1e-5, rtol=0)  # rows
    # the first centre patch is position (0, 0) at any size: sin 0 = 0, cos 0 = 1
    for s in (8, 16, 32):
        g = int(s * 1.5)
        first = scaled_sincos_table(dim, g, s).reshape(g, g, dim)[(g - s) // 2, (g - s) // 2]
        torch.testing.assert_close(first, sincos_1d(dim // 2, torch.zeros(2)).reshape(-1).float(), atol=1e-5, rtol=0)


def test_an_input_takes_the_table_of_its_area_or_one_of_its_own_longer_side():
    assert latent_sizes([(1024, 1024), (768, 1344), (1024, 1024)]) == [127, 128]  # round(sqrt(w*h)) // 8
    scaled = ScaledPositions(16, 2, [64, 128])  # patched 32 and 64: area limits (32²+64²)//2 and (1.5*64)²
    assert scaled.area_limits == [(2560, 32), (9216, 64)]
    assert scaled.sample_size(32, 32) == 32 and scaled.table_size(32, 32) == 48
    assert scaled.sample_size(40, 40) == 32
    assert scaled.sample_size(50, 50) == 50 and scaled.table_size(50, 50) == 75  # 50 > 48: a table of its own
    assert scaled.sample_size(51, 51) == 64 and scaled.table_size(51, 51) == 96
    assert scaled.sample_size(20, 120) == 120  # too wide for the 96 table
    assert scaled.sample_size(100, 100) == 100  # over the last limit: the largest, then too long for it
    assert scaled.sample_size(40, 40) == 32  # nothing seen before changes the choice
    table = scaled.table(32, 32)
    assert table.shape == (48, 48, 16) and scaled.table(30, 34) is table  # kept for the next call


def test_crops_are_per_sample_from_the_row_key_within_the_table():
    assert crop_offsets(KEYS[:10], 0.0, 12, 4, 6) == [None] * 10
    every = crop_offsets(KEYS, 1.0, 12, 4, 6)
    tops, lefts = {o[0] for o in every}, {o[1] for o in every}
    assert tops == set(range(0, 9)) and lefts == set(range(0, 7))  # every place of a 4x6 crop of a 12x12 table
    half = crop_offsets(KEYS, 0.5, 12, 4, 6)
    assert abs(sum(o is not None for o in half) / len(KEYS) - 0.5) < 0.05
    # the same sample gets the same crop wherever a split batch puts it
    assert crop_offsets(KEYS[:4], 0.5, 12, 4, 6)[2:] == crop_offsets(KEYS[2:4], 0.5, 12, 4, 6)
    assert crop_offsets(KEYS[:4][::-1], 0.5, 12, 4, 6) == crop_offsets(KEYS[:4], 0.5, 12, 4, 6)[::-1]


def _family(model, **values) -> SD3Family:
    base = {"pretrained_model_name_or_path": str(model), "sd3_clip_l": "", "clip_g": "", "sd3_t5xxl": "", "vae": "",
            "weighting_scheme": "logit_normal", "logit_mean": 0, "logit_std": 1, "mode_scale": 1.29,
            "sd3_cache_text_encoder_outputs": False, "dataset_config": "", "max_resolution": "64,64",
            "resolution": (64, 64)}
    settings = SimpleNamespace(**{**base, **values})
    family = SD3Family(settings)
    family.load(settings, torch.float32, torch.device("cpu"), lambda *_: None)
    return family


@pytest.fixture(scope="module")
def inputs(tiny_sd3_dir):
    family = _family(tiny_sd3_dir)
    with torch.no_grad():
        cond = family.encode_prompt(family.tokenize(["a photo of sks dog", "a cat"]))
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    return cond, x, torch.tensor([500.0])


def test_the_mmdit_crops_each_sample_where_it_is_told(tiny_sd3_dir):
    mmdit = _family(tiny_sd3_dir).unet
    size = mmdit.config.pos_embed_max_size
    table = mmdit.pos_embed.reshape(size, size, -1)
    centre = mmdit.cropped_pos_embed(4, 4)
    assert centre.shape[0] == 1
    crops = mmdit.cropped_pos_embed(4, 4, [None, (0, 1)])
    torch.testing.assert_close(crops[0], centre[0], rtol=0, atol=0)
    torch.testing.assert_close(crops[1], table[0:4, 1:5].reshape(16, -1), rtol=0, atol=0)


def test_a_crop_rate_changes_training_predictions_only_and_per_sample(tiny_sd3_dir, inputs):
    cond, x, t = inputs
    plain, cropped = _family(tiny_sd3_dir), _family(tiny_sd3_dir, pos_emb_random_crop_rate=1.0)
    batch = SimpleNamespace(row_keys=KEYS[:2])
    with torch.no_grad():
        reference = plain.predict(x, t, cond, batch)
        assert torch.equal(cropped.predict(x, t, cond, None), reference)  # no training batch: the centre
        assert not torch.allclose(cropped.predict(x, t, cond, batch), reference)
        whole = cropped.predict(x, t, cond, batch)
        second = cropped.predict(x[1:], t, type(cond)(cond.context[1:], cond.pooled[1:]),
                                 SimpleNamespace(row_keys=KEYS[1:2]))
        torch.testing.assert_close(second, whole[1:], atol=1e-5, rtol=1e-5)


def test_scaled_position_embeddings_replace_the_stored_table(tiny_sd3_dir, inputs):
    cond, x, t = inputs
    family = _family(tiny_sd3_dir, sd3_enable_scaled_pos_embed=True)
    mmdit = family.unet
    hidden = mmdit.config.hidden_size
    # 64 px: latent size 8, 4x4 patches, a 6x6 table whose centre 4x4 spans 0..16 in steps of 4
    assert mmdit.scaled_positions.area_limits == [(36, 4)]
    expected = scaled_sincos_table(hidden, 6, 4).reshape(6, 6, hidden)[1:5, 1:5].reshape(1, 16, hidden)
    torch.testing.assert_close(mmdit.cropped_pos_embed(4, 4), expected, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(family.predict(x, t, cond, None), _family(tiny_sd3_dir).predict(x, t, cond, None))


@pytest.mark.slow
def test_a_two_step_run_with_scaled_and_cropped_positions_trains_and_samples(tiny_sd3_dir, images, tmp_path):
    from test_sd3_train import SAMPLE, sd3_settings
    from trainer.loop import train
    from trainer.preflight import check

    settings = sd3_settings(tiny_sd3_dir, images, tmp_path / "out", sd3_enable_scaled_pos_embed=True,
                            pos_emb_random_crop_rate=0.5, train_batch_size=2, sample_prompts=SAMPLE,
                            sample_every_n_steps=2)
    named = {p.field for p in check(settings, deep=False).problems}
    assert not named & {"sd3_enable_scaled_pos_embed", "pos_emb_random_crop_rate"}, named
    result = train(settings)
    assert result.status == "finished" and result.step == 2, result.error
    assert (tmp_path / "out" / "tiny.safetensors").is_file()
    assert list((tmp_path / "out" / "sample").glob("*.png"))
