"""A full disk in the GUI: the run ends, the page shows the advice and a "Save to…" row, and that row writes
the LoRA the trainer kept in memory to another folder (never over an existing file)."""
from __future__ import annotations

import errno
import os

import pytest
from safetensors import safe_open

from app.run_manager import RunManager
from app.run_panel import NOTHING_SHOWN, refresh
from test_faults_saving import fill_disk_after_first_save
from test_train import images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer import events as ev

pytestmark = pytest.mark.slow  # trains a tiny model


def test_a_full_disk_offers_save_to_and_it_writes_the_kept_lora(tiny_sd1_dir, images, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    disk = fill_disk_after_first_save(monkeypatch, out, OSError(errno.ENOSPC, "No space left on device"))
    def train_fn(settings, sink, control):
        from trainer.loop import train

        def watch(event):  # the disk fills up once the first file is on it
            sink(event)
            disk["full"] |= isinstance(event, ev.Saved)
        return train(settings, watch, control)

    runs = RunManager(train_fn)
    assert runs.save_kept_to(str(tmp_path)) == (False, "No trained LoRA is waiting to be saved.")
    started, _ = runs.start(tiny_settings(tiny_sd1_dir, images, out, epoch=2, save_every_n_steps=1))
    assert started and runs.wait(timeout=300)
    snap = runs.snapshot()
    assert snap.status == "error" and snap.disk_full is not None
    assert any("12 MiB free" in line and "Save to…" in line for line in snap.log)
    page = refresh(snap, NOTHING_SHOWN)
    assert page.save_kept_visible is True

    monkeypatch.undo()  # the user picks a folder on another disk
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"mine")
    assert runs.save_kept_to(str(taken)) == (False, f"{taken} exists already: choose another folder or file name.")
    assert taken.read_bytes() == b"mine"
    assert runs.save_kept_to("  ")[0] is False

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    saved, text = runs.save_kept_to(str(elsewhere))
    written = elsewhere / "tiny-step00000002.safetensors"
    assert saved and text == f"Saved the LoRA of step 2 to {written}."
    with safe_open(str(written), "pt") as f:
        assert f.metadata()["ss_steps"] == "2"
    assert "tiny-step00000001.safetensors" in os.listdir(out)  # what the full disk did hold stays
    after = runs.snapshot()
    assert after.kept_saved_to == str(written)
    assert refresh(after, page.shown).save_kept_visible is False
