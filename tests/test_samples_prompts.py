"""Sample prompt parsing (sd-scripts' syntax and files), sampler table, sample file names. No models."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from trainer.inference.prompts import SamplePrompt, parse_prompt_line, parse_prompt_text, parse_sample_prompts
from trainer.inference.schedulers import ALIASES, SAMPLER_NAMES, SCHEDULERS, canonical_sampler, make_scheduler
from trainer.inference.training_samples import sample_file_name
from trainer.settings.tab_advanced import SAMPLERS


def test_plain_prompt_gets_sd_scripts_defaults():
    p = parse_prompt_line("a photo of sks dog, masterpiece")
    assert p == SamplePrompt("a photo of sks dog, masterpiece", "", 512, 512, None, 7.5, 30, None, 0)


def test_every_option_is_read():
    p = parse_prompt_line("sks dog in snow --n blurry, lowres --w 768 --h 640 --d 42 --l 5.5 --s 28 --ss k_euler_a", 3)
    assert (p.prompt, p.negative_prompt, p.width, p.height, p.seed, p.scale, p.steps, p.sampler, p.index) == (
        "sks dog in snow", "blurry, lowres", 768, 640, 42, 5.5, 28, "k_euler_a", 3)


def test_options_are_case_insensitive_and_order_free():
    p = parse_prompt_line("cat --S 12 --N ugly --W 320 --D 7")
    assert (p.prompt, p.steps, p.negative_prompt, p.width, p.seed) == ("cat", 12, "ugly", 320, 7)


@pytest.mark.parametrize("given, expected", [(513, 512), (519, 512), (70, 64), (63, 64), (8, 64), (1000, 1000)])
def test_sizes_round_down_to_multiples_of_8_at_least_64(given, expected):
    p = parse_prompt_line(f"x --w {given} --h {given}")
    assert (p.width, p.height) == (expected, expected)


@pytest.mark.parametrize("given, expected", [(0, 1), (1, 1), (999, 999), (5000, 1000)])
def test_steps_are_clamped(given, expected):
    assert parse_prompt_line(f"x --s {given}").steps == expected


def test_unknown_and_malformed_options_are_ignored():
    p = parse_prompt_line("x --cn control.png --g 3.5 --l 7..5 --w wide --d -1 --foo bar")
    assert p == SamplePrompt("x", guidance=3.5)  # --g is read: FLUX.1 dev's embedded guidance


def test_ss_is_not_read_as_steps():
    p = parse_prompt_line("x --ss dpmsolver++ --s 9")
    assert (p.sampler, p.steps) == ("dpmsolver++", 9)


def test_text_skips_empty_and_comment_lines_and_numbers_prompts():
    prompts = parse_prompt_text("# my prompts\n\n  first --d 1\n   \n#second\nthird\n")
    assert [(p.prompt, p.index, p.seed) for p in prompts] == [("first", 0, 1), ("third", 1, None)]


def test_setting_may_name_a_txt_json_or_toml_file(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("a --w 256\n# no\nb --n c\n", encoding="utf-8")
    assert [(p.prompt, p.width, p.negative_prompt) for p in parse_sample_prompts(str(txt))] == [
        ("a", 256, ""), ("b", 512, "c")]
    js = tmp_path / "prompts.json"
    js.write_text(json.dumps(["plain --s 3", {"prompt": "dict", "width": 300, "sample_steps": 2000, "seed": 9,
                                              "scale": 4, "negative_prompt": "n", "sample_sampler": "heun"}]))
    first, second = parse_sample_prompts(str(js))
    assert (first.prompt, first.steps, first.index) == ("plain", 3, 0)
    assert (second.prompt, second.width, second.steps, second.seed, second.scale, second.negative_prompt,
            second.sampler, second.index) == ("dict", 296, 1000, 9, 4, "n", "heun", 1)
    toml = tmp_path / "prompts.toml"
    toml.write_text('[prompt]\nwidth = 128\nsample_steps = 4\n[[prompt.subset]]\nprompt = "one"\n'
                    '[[prompt.subset]]\nprompt = "two"\nwidth = 64\n')
    assert [(p.prompt, p.width, p.steps) for p in parse_sample_prompts(str(toml))] == [("one", 128, 4), ("two", 64, 4)]


def test_a_prompt_that_looks_like_a_missing_file_is_a_prompt():
    assert [p.prompt for p in parse_sample_prompts("my_prompts.txt")] == ["my_prompts.txt"]


def test_every_gui_sampler_choice_is_in_the_table():
    assert set(SAMPLERS) == set(SAMPLER_NAMES)
    assert canonical_sampler("K_EULER_A") == "euler_a"
    with pytest.raises(ValueError, match="unknown sampler"):
        canonical_sampler("ddpm++")


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_builds_with_the_training_betas(name):
    scheduler = make_scheduler(name, v_prediction=True)
    expected = SCHEDULERS[ALIASES.get(name, name)][0]
    assert expected in [cls.__name__ for cls in type(scheduler).__mro__]
    config = scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule, config.num_train_timesteps) == (
        0.00085, 0.012, "scaled_linear", 1000)
    assert config.prediction_type == "v_prediction"
    assert make_scheduler(name, v_prediction=False).config.prediction_type == "epsilon"
    scheduler.set_timesteps(3)  # usable at the few steps the tests use


def test_samplers_take_the_betas_of_the_family_spec():
    from trainer.families import DiffusionSchedule, family_spec

    assert make_scheduler("euler", False, betas=family_spec("sdxl").schedule).config.beta_end == 0.012
    other = make_scheduler("euler", False, betas=DiffusionSchedule(num_train_timesteps=500, beta_end=0.02)).config
    assert (other.num_train_timesteps, other.beta_end) == (500, 0.02)


def test_ddim_clips_like_sd_scripts_unless_told_not_to():
    assert make_scheduler("ddim", False).config.clip_sample is True
    assert make_scheduler("ddim", False, clip_sample=False).config.clip_sample is False


def test_lms_coefficients_without_scipy_match_numeric_integration():
    scheduler = make_scheduler("lms", False)
    scheduler.set_timesteps(10)
    sigmas = [float(s) for s in scheduler.sigmas]
    for order, t, current in [(1, 0, 0), (2, 3, 0), (2, 3, 1), (4, 6, 0), (4, 6, 2), (4, 6, 3)]:
        taus = np.linspace(sigmas[t], sigmas[t + 1], 20001)
        values = np.ones_like(taus)
        for k in range(order):
            if k != current:
                values *= (taus - sigmas[t - k]) / (sigmas[t - current] - sigmas[t - k])
        reference = float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(taus)))
        assert scheduler.get_lms_coefficient(order, t, current) == pytest.approx(reference, rel=1e-6, abs=1e-9)


def test_sample_file_names_follow_kohya():
    when = time.mktime((2024, 5, 6, 7, 8, 9, 0, 0, -1))
    assert sample_file_name("mylora", 500, None, 1, None, when) == "mylora_000500_01_20240506070809.png"
    assert sample_file_name("mylora", 120, 3, 0, 42, when) == "mylora_e000003_00_20240506070809_42.png"
    assert sample_file_name("mylora", 0, 0, 12, 7, when) == "mylora_e000000_12_20240506070809_7.png"
