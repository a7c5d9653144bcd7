"""Extend a finished run: N more epochs or steps from its state folder (or its LoRA file), continuing the
file numbering, the lifetime step count and the learning-rate schedule; 2 epochs + 1 equals 3 epochs."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from test_train import Recorder, images, metadata, tiny_settings  # noqa: F401  (images: a fixture)
from trainer import events as ev
from trainer.cli import main
from trainer.extend import ExtendError, extend_run, find_run_config, run_name
from trainer.loop import train


def test_run_name_of_state_folders_and_files():
    assert run_name("/o/tiny-state") == run_name("/o/tiny-000002-state/") == "tiny"
    assert run_name("/o/tiny-step00000005-state") == run_name("/o/tiny-000003.safetensors") == "tiny"
    assert run_name("/o/my-lora-v2.safetensors") == "my-lora-v2"


def test_the_newest_settings_file_of_the_run_is_found(tmp_path):
    for name in ("tiny_20260101-120000.json", "tiny_20260301-090000.json", "tiny2_20270101-000000.json", "tiny.json"):
        (tmp_path / name).write_text("{}")
    assert find_run_config(tmp_path, "tiny") == str(tmp_path / "tiny_20260301-090000.json")
    assert find_run_config(tmp_path, "other") is None


def test_extend_by_steps_or_epochs_not_both(tmp_path):
    with pytest.raises(ExtendError, match="steps or a number of epochs"):
        extend_run(object(), str(tmp_path), steps=1, epochs=1)


def test_the_cli_names_the_missing_settings_file(tmp_path, capsys):
    (tmp_path / "tiny-state").mkdir()
    assert main(["extend", str(tmp_path / "tiny-state"), "--epochs", "1"]) == 2
    assert "no tiny_<time>.json" in capsys.readouterr().err


def lora_names(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))


def same_tensors(a, b) -> bool:
    a, b = load_file(a), load_file(b)
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_epochs_extended_by_one_equal_three_epochs(tiny_sd1_dir, images, tmp_path, capsys):  # noqa: F811
    common = dict(save_every_n_epochs=1, network_dropout=0.1)  # constant schedule; dropout: the RNG goes on too
    first = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "a", epoch=2, save_state_on_train_end=True, **common))
    assert first.status == "finished" and lora_names(tmp_path / "a") == ["tiny-000001.safetensors", "tiny.safetensors"]
    code = main(["extend", str(tmp_path / "a" / "tiny-state"), "--epochs", "1"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "settings: " in printed.out and "(the newest the run wrote)" in printed.out
    assert "kept as tiny-000002.safetensors" in printed.out and "as if the run had been planned" in printed.out
    straight = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "b", epoch=3, **common))
    names = ["tiny-000001.safetensors", "tiny-000002.safetensors", "tiny.safetensors"]
    assert lora_names(tmp_path / "a") == lora_names(tmp_path / "b") == names
    for name in names:  # bit for bit, tensor by tensor (the files' time stamps differ)
        assert same_tensors(tmp_path / "a" / name, tmp_path / "b" / name), name
    extended, three = metadata(tmp_path / "a" / "tiny.safetensors"), metadata(tmp_path / "b" / "tiny.safetensors")
    assert (extended["ss_steps"], extended["ss_epoch"]) == (three["ss_steps"], three["ss_epoch"]) == ("6", "3")
    assert metadata(tmp_path / "a" / "tiny-000002.safetensors")["ss_steps"] == "4"


@pytest.mark.slow
def test_extending_by_steps_continues_the_schedule_as_if_planned_longer(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    common = dict(lr_scheduler="cosine", epoch=2)
    first = tiny_settings(tiny_sd1_dir, images, tmp_path / "a", save_state=True, **common)
    assert train(first).status == "finished"
    extension = extend_run(first, str(tmp_path / "a" / "tiny-state"), steps=3)
    rec = Recorder()
    result = train(extension.settings, rec)
    assert result.status == "finished" and result.step == 7, result.error
    straight = Recorder()
    train(tiny_settings(tiny_sd1_dir, images, tmp_path / "b", max_train_steps=7, **common), straight)
    assert [s.step for s in rec.of(ev.Step)] == [5, 6, 7]
    assert [s.lr for s in rec.of(ev.Step)] == [s.lr for s in straight.of(ev.Step)][4:]
    assert "as if the run had been planned this long" in rec.logs()
    assert metadata(tmp_path / "a" / "tiny.safetensors")["ss_steps"] == "7"
    assert json.loads((tmp_path / "a" / "tiny-state" / "train_state.json").read_text())["current_step"] == 7


@pytest.mark.slow
def test_a_run_without_state_goes_on_from_its_lora_with_a_fresh_optimizer(tiny_sd1_dir, images, tmp_path, capsys):  # noqa: F811
    first = train(tiny_settings(tiny_sd1_dir, images, tmp_path, epoch=2, save_every_n_epochs=1))
    assert first.status == "finished"
    assert main(["extend", str(tmp_path / "tiny.safetensors"), "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "has no saved training state" in printed and "fresh optimizer" in printed
    assert lora_names(tmp_path) == ["tiny-000001.safetensors", "tiny-000002.safetensors", "tiny-000003.safetensors",
                                    "tiny.safetensors"]
    final = metadata(tmp_path / "tiny.safetensors")
    assert (final["ss_steps"], final["ss_epoch"]) == ("8", "4")
    assert metadata(tmp_path / "tiny-000003.safetensors")["ss_steps"] == "6"


@pytest.mark.slow
def test_train_more_in_the_gui_goes_on_from_the_last_run(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    from app.run_manager import RunManager
    from app.run_panel import NOTHING_SHOWN, refresh, train_more_request

    runs = RunManager()
    runs.start(tiny_settings(tiny_sd1_dir, images, tmp_path, save_state=True))
    assert runs.wait(300) and runs.snapshot().status == "finished"
    assert refresh(runs.snapshot(), NOTHING_SHOWN).train_more_visible
    assert "1 or more" in train_more_request(runs, 0, "steps")[0]
    text, started = train_more_request(runs, 2, "steps")
    assert started and "tiny-state" in text
    assert runs.wait(300)
    snap = runs.snapshot()
    assert snap.status == "finished" and snap.step == 4, snap.log
    assert any("as if the run had been planned" in line for line in snap.log)
    for name in os.listdir(tmp_path):  # no state left: it goes on from the LoRA file with a fresh optimizer
        if name.endswith("-state"):
            os.rename(tmp_path / name, tmp_path / (name + "-gone"))
    text, started = train_more_request(runs, 1, "epochs")
    assert started and "fresh optimizer" in text, text
    assert runs.wait(300) and runs.snapshot().status == "finished", runs.snapshot().log
    assert metadata(tmp_path / "tiny.safetensors")["ss_steps"] == "6"
