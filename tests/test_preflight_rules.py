"""Preflight rules: optimizer/scheduler/learning rates, network, output and training settings."""
from __future__ import annotations

import collections
from dataclasses import replace

import numpy as np
import pytest
from safetensors.numpy import save_file

from test_preflight_support import big_cpu, gpu, problems, settings
from trainer.preflight import check
from trainer.preflight import device as device_module
from trainer import safety


@pytest.fixture(autouse=True)
def fixed_device(monkeypatch):
    monkeypatch.setattr(device_module, "probe_device", big_cpu)


@pytest.fixture
def run(tmp_path, tiny_sd1_file):
    """Build settings for a valid run with overrides and check them."""

    def make(**overrides):
        s = settings(tmp_path, tiny_sd1_file, **overrides)
        return s, check(s)

    return make


# ---- optimizer and scheduler ------------------------------------------------------------------

def test_adafactor_with_warmup_is_adjusted_with_notes(run):
    s, report = run(optimizer="Adafactor", lr_scheduler="cosine", lr_warmup=10)
    assert report.ok, report.format()
    [warmup] = problems(report, "note", "lr_warmup")
    assert "set to 0" in warmup.message and "relative_step=False" in warmup.fix
    [scheduler] = problems(report, "note", "lr_scheduler")
    assert "'cosine' is replaced by 'adafactor'" in scheduler.message
    adjusted = report.adjusted(s)
    assert (adjusted.lr_warmup, adjusted.lr_warmup_steps, adjusted.lr_scheduler) == (0, 0, "adafactor")
    assert (s.lr_warmup, s.lr_scheduler) == (10, "cosine")  # the user's settings are untouched
    assert check(adjusted).changes() == {}  # nothing left to adjust


def test_adafactor_adjustments_match_the_trainer(run):
    from trainer.optim import plan_optimizer, plan_scheduler

    s, report = run(optimizer="Adafactor", lr_scheduler="cosine", lr_warmup_steps=5)
    adjusted = report.adjusted(s)
    optimizer = plan_optimizer(adjusted, "cpu")
    scheduler = plan_scheduler(adjusted, report.plan.total_steps, optimizer.scheduler_override)
    assert scheduler.name == adjusted.lr_scheduler and scheduler.warmup_steps == 0 and not scheduler.notes


def test_adafactor_without_relative_step_keeps_the_schedule(run):
    s, report = run(optimizer="Adafactor", optimizer_args="scale_parameter=False relative_step=False warmup_init=False",
                    lr_scheduler="constant_with_warmup", lr_warmup=10)
    assert report.ok and report.changes() == {}
    s, report = run(optimizer="Adafactor", optimizer_args="relative_step=False", lr_scheduler="adafactor")
    [note] = problems(report, "note", "lr_scheduler")
    assert "'constant' is used instead" in note.message and report.adjusted(s).lr_scheduler == "constant"
    s, report = run(optimizer="Adafactor", optimizer_args="relative_step=False warmup_init=True", lr_scheduler="constant")
    [note] = problems(report, "note", "optimizer_args")
    assert report.adjusted(s).optimizer_args == "relative_step=True warmup_init=True"


def test_adafactor_scheduler_with_another_optimizer_is_refused(run):
    _, report = run(optimizer="AdamW", lr_scheduler="adafactor")
    [error] = problems(report, "error", "lr_scheduler")
    assert "only with the Adafactor optimizer" in error.message


def test_constant_scheduler_with_warmup_is_adjusted(run):
    from trainer.optim import plan_scheduler

    s, report = run(lr_scheduler="constant", lr_warmup=10)
    [note] = problems(report, "note", "lr_warmup")
    assert "'constant' scheduler has no warmup" in note.message and "constant_with_warmup" in note.fix
    adjusted = report.adjusted(s)
    assert adjusted.lr_warmup == 0 and not plan_scheduler(adjusted, 100).notes


def test_warmup_notes_and_too_long_warmup(run):
    _, report = run(lr_scheduler="cosine", lr_warmup=10, lr_warmup_steps=3)
    assert problems(report, "note", "lr_warmup_steps")
    _, report = run(lr_scheduler="cosine", lr_warmup_steps=1000)
    [warning] = problems(report, "warning", "lr_warmup_steps")
    assert "1000 steps" in warning.message and f"({report.plan.total_steps} steps)" in warning.message


def test_adaptive_optimizers_want_a_learning_rate_near_one(run):
    _, report = run(optimizer="Prodigy", learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=1e-4)
    assert {p.field for p in report.errors} == {"unet_lr", "text_encoder_lr"}
    assert all("about 1" in p.message and "1.0" in p.fix for p in report.errors)
    _, report = run(optimizer="DAdaptAdam", learning_rate=1e-4, unet_lr=0, text_encoder_lr=0)
    assert [p.field for p in report.errors] == ["learning_rate"]
    _, report = run(optimizer="Prodigy", learning_rate=1.0, unet_lr=1.0, text_encoder_lr=1.0)
    assert report.ok, report.format()
    _, report = run(optimizer="Prodigy", learning_rate=1.0, unet_lr=1.0, text_encoder_lr=0.5)
    assert report.ok and "Unet's (1)" in problems(report, "note", "text_encoder_lr")[0].message


def test_learning_rate_rules(run):
    _, report = run(learning_rate=0, unet_lr=0, text_encoder_lr=0)
    [error] = problems(report, "error", "learning_rate")
    assert "nothing would be trained" in error.message
    _, report = run(unet_lr=1e-4, text_encoder_lr=0)
    assert "UNet only" in problems(report, "note", "text_encoder_lr")[0].message
    _, report = run(unet_lr=0, text_encoder_lr=1e-4)
    assert problems(report, "warning", "unet_lr")
    _, report = run(unet_lr=0.5, text_encoder_lr=1e-4)
    assert "very high" in problems(report, "warning", "unet_lr")[0].message
    _, report = run(optimizer="Lion", unet_lr=1e-8, text_encoder_lr=1e-4)
    assert "very low" in problems(report, "warning", "unet_lr")[0].message


def test_lowercase_booleans_and_unknown_optimizers_are_refused(run):
    _, report = run(optimizer="Adafactor", optimizer_args="relative_step=false")
    [error] = problems(report, "error", "optimizer_args")
    assert "relative_step=False" in error.fix
    _, report = run(optimizer="nosuchpackage.Optimizer")
    assert "nosuchpackage" in problems(report, "error", "optimizer")[0].message
    _, report = run(optimizer="NoSuchOptimizer")
    assert "unknown optimizer" in problems(report, "error", "optimizer")[0].message
    _, report = run(optimizer="RAdam")  # a bare torch.optim class, as sd-scripts accepts
    assert not problems(report, "error", "optimizer")


def test_scheduler_options_it_does_not_take_are_refused_before_loading(run):
    _, report = run(lr_scheduler="cosine", lr_scheduler_args="T_max=10 num_cycles=2")
    [error] = problems(report, "error", "lr_scheduler_args")
    assert "T_max" in error.message and "num_cycles" not in error.message and "num_cycles" in error.fix
    _, report = run(lr_scheduler="cosine_with_restarts", lr_scheduler_args="num_cycles=3")
    assert not problems(report, "error", "lr_scheduler_args")


def test_missing_optimizer_package(run, monkeypatch):
    import importlib.util

    from trainer.preflight import optimizer as optimizer_module

    real = importlib.util.find_spec
    monkeypatch.setattr(optimizer_module, "_find_module", lambda m: None if m == "prodigyopt" else real(m))
    _, report = run(optimizer="Prodigy", learning_rate=1, unet_lr=1, text_encoder_lr=1)
    [error] = problems(report, "error", "optimizer")
    assert "pip install prodigyopt" in error.fix


def test_one_optimizer_table_feeds_the_dropdown_the_check_and_the_nan_hint():
    from trainer.optim.table import DROPDOWN_NAMES, OPTIMIZERS, optimizer_facts
    from trainer.safety import nan_hint
    from trainer.settings import TrainingSettings, setting_info

    assert tuple(setting_info("optimizer").choices) == DROPDOWN_NAMES
    assert set(DROPDOWN_NAMES) == {kind.name for kind in OPTIMIZERS.values() if kind.listed}
    assert optimizer_facts("pagedadamw") is OPTIMIZERS["pagedadamw"]  # accepted though kohya_ss does not list it
    high_lr = dict(learning_rate=1.0, unet_lr=1.0, text_encoder_lr=1.0)
    for kind in OPTIMIZERS.values():
        hint = nan_hint(TrainingSettings(optimizer=kind.name, **high_lr))
        assert ("lower the learning rate" in hint) != kind.adaptive_lr, kind.name


# ---- network ------------------------------------------------------------------------------------

def test_alpha_greater_than_rank_and_unsupported_type(run):
    _, report = run(network_dim=8, network_alpha=16)
    [warning] = problems(report, "warning", "network_alpha")
    assert "greater than the rank (8)" in warning.message and report.ok
    _, report = run(LoRA_type="Kohya LoCon", conv_dim=4, conv_alpha=8)
    assert problems(report, "warning", "conv_alpha")
    _, report = run(LoRA_type="Kohya LoHa")
    assert "not supported" in problems(report, "error", "LoRA_type")[0].message


def test_network_weights(run, tmp_path):
    _, report = run(dim_from_weights=True)
    assert problems(report, "error", "dim_from_weights")
    _, report = run(network_weights=str(tmp_path / "none.safetensors"))
    assert "does not exist" in problems(report, "error", "network_weights")[0].message
    lora = tmp_path / "old.safetensors"
    save_file({"lora_unet_a.lora_down.weight": np.zeros((16, 32), np.float32),
               "lora_unet_a.lora_up.weight": np.zeros((32, 16), np.float32)}, lora)
    _, report = run(network_weights=str(lora), network_dim=8)
    [error] = problems(report, "error", "network_dim")
    assert "rank 16" in error.message and "DIM from weights" in error.fix
    assert run(network_weights=str(lora), network_dim=16)[1].ok
    assert run(network_weights=str(lora), dim_from_weights=True)[1].ok
    not_lora = tmp_path / "not_lora.safetensors"
    save_file({"something": np.zeros(2, np.float32)}, not_lora)
    assert "no LoRA weights" in problems(run(network_weights=str(not_lora))[1], "error", "network_weights")[0].message


# ---- output -------------------------------------------------------------------------------------

def test_output_folder_rules(run, tmp_path):
    assert "not set" in problems(run(output_dir="")[1], "error", "output_dir")[0].message
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is a file" in problems(run(output_dir=str(a_file))[1], "error", "output_dir")[0].message
    [error] = problems(run(output_dir=str(a_file / "sub"))[1], "error", "output_dir")
    assert "cannot be created" in error.message
    assert "will be created" in problems(run(output_dir=str(tmp_path / "new" / "deeper"))[1], "note", "output_dir")[0].message


def test_output_name_rules_even_without_settings_validation(run):
    s, _ = run()
    for name, expected in [("a/b", "path separator"), ("CON", "reserved"), ("name.", "ends with"), ("x" * 250, "too long")]:
        [error] = problems(check(s.model_copy(update={"output_name": name})), "error", "output_name")
        assert expected in error.message, (name, error.message)


def test_existing_output_would_be_overwritten(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "my_lora.safetensors").write_bytes(b"old")
    (out / "my_lora-000001.safetensors").write_bytes(b"old")
    (out / "my_lora_other.safetensors").write_bytes(b"not ours")
    _, report = run()
    [warning] = problems(report, "warning", "output_name")
    assert "2 file(s)" in warning.message and "my_lora.safetensors" in warning.message and "my_lora_2" in warning.fix
    assert report.ok
    assert not problems(run(save_model_as="ckpt")[1], "warning", "output_name")


def test_not_enough_disk_space(run, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    [error] = problems(run()[1], "error", "output_dir")
    assert "free" in error.message


def test_resume_and_samples(run, tmp_path):
    assert problems(run(resume=str(tmp_path / "no-state"))[1], "error", "resume")
    assert problems(run(sample_every_n_epochs=1)[1], "warning", "sample_prompts")
    assert not problems(run(sample_every_n_epochs=1, sample_prompts="a dog")[1], "warning", "sample_prompts")


# ---- training settings ------------------------------------------------------------------------

def test_augmentation_turns_latent_caching_off(run):
    s, report = run(cache_latents=True, color_aug=True)
    [note] = problems(report, "note", "cache_latents")
    assert "Color augmentation changes" in note.message and report.adjusted(s).cache_latents is False


def test_precision_notes_depend_on_the_device(run, monkeypatch, tmp_path, tiny_sdxl_file):
    assert problems(run(mixed_precision="fp16")[1], "note", "mixed_precision")
    monkeypatch.setattr(device_module, "probe_device", lambda: gpu(80))
    assert not problems(run(mixed_precision="fp16")[1], "note", "mixed_precision")
    assert problems(run(mixed_precision="bf16", full_fp16=True)[1], "note", "full_fp16")
    report = check(settings(tmp_path, tiny_sdxl_file, sdxl=True, mixed_precision="fp16"))
    assert "NaN" in problems(report, "warning", "sdxl_no_half_vae")[0].message
    report = check(settings(tmp_path, tiny_sdxl_file, sdxl=True, mixed_precision="fp16", sdxl_no_half_vae=True))
    assert not problems(report, "warning", "sdxl_no_half_vae")


def test_bf16_on_a_cpu_with_bf16_instructions_needs_no_note(run, monkeypatch):
    assert "without bf16 instructions" in problems(run(mixed_precision="bf16")[1], "note", "mixed_precision")[0].message
    monkeypatch.setattr(device_module, "probe_device", lambda: replace(big_cpu(), native_bf16=True))
    assert not problems(run(mixed_precision="bf16")[1], "note", "mixed_precision")
    [fp16] = problems(run(mixed_precision="fp16")[1], "note", "mixed_precision")
    assert "needs a GPU" in fp16.message and "bf16 would be faster" in fp16.message


def test_text_encoder_output_cache(run, tmp_path, tiny_sdxl_file):
    report = check(settings(tmp_path, tiny_sdxl_file, sdxl=True, sdxl_cache_text_encoder_outputs=True, shuffle_caption=True))
    assert problems(report, "note", "sdxl_cache_text_encoder_outputs")
    assert problems(report, "warning", "shuffle_caption")
    assert "ignored" in problems(run(sdxl_cache_text_encoder_outputs=True)[1], "note", "sdxl_cache_text_encoder_outputs")[0].message


def test_xformers_falls_back_on_cpu(run):
    assert "sdpa" in problems(run(xformers="xformers")[1], "note", "xformers")[0].message
