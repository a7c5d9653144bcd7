"""Saving under faults, driven through the trainer as a user runs it (CPU, tiny SD1): NaN weights are never
a result, a full disk keeps the LoRA in memory for a later save, temp files of killed runs are removed by
the next run, and files get the umask's mode."""
from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from test_train import Recorder, images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer import events as ev
from trainer import safety
from trainer.commands import train_cmd
from trainer.control import Control
from trainer.loop import train
from trainer.optim.stepper import OptimizerStepper
from trainer.settings import save_settings

pytestmark = pytest.mark.slow  # trains tiny models, some in a subprocess

REPO = Path(__file__).resolve().parents[1]


def finite(path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


# ---- NaN stop ------------------------------------------------------------------------------------

@pytest.mark.parametrize("save_every_n_steps, nan_after, kept", [
    (0, 11, "tiny-step00000010.safetensors"),  # no file saved yet: the in-memory copy of step 10 is written
    (5, 10, "tiny-step00000005.safetensors"),  # step 10's save finds NaN: the file of step 5 is the result
])
def test_nan_weights_are_never_saved_or_listed(tiny_sd1_dir, images, tmp_path, monkeypatch,  # noqa: F811
                                               save_every_n_steps, nan_after, kept):
    real_step, calls = OptimizerStepper.step, {"n": 0}

    def step_then_blow_up(self):  # as a too-high learning rate does: the weights turn NaN
        real_step(self)
        calls["n"] += 1
        if calls["n"] == nan_after:
            with torch.no_grad():
                for param in self.optimizer.param_groups[0]["params"]:
                    param.fill_(float("nan"))

    monkeypatch.setattr(OptimizerStepper, "step", step_then_blow_up)
    rec = Recorder()
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path, epoch=6, save_every_n_steps=save_every_n_steps)
    result = train(settings, rec)
    assert result.status == "failed" and result.field == "nan_loss_policy"
    assert [os.path.basename(f) for f in result.files] == [kept]
    assert all(finite(p) for p in tmp_path.glob("*.safetensors"))
    assert [os.path.basename(e.path) for e in rec.of(ev.Saved)][-1] == kept
    error = rec.of(ev.Error)[0]
    assert "NaN" in error.message and "To fix" in error.message + (error.hint or "")
    assert f"the LoRA weights are NaN or infinite at step {nan_after}" in rec.logs() or save_every_n_steps


# ---- full disk -----------------------------------------------------------------------------------

def fill_disk_after_first_save(monkeypatch, folder, error):
    """From the second LoRA file on, every write into ``folder`` fails as on a full disk with 12 MiB free."""
    state = {"full": False}
    real_fsync, real_usage = safety.os.fsync, safety.shutil.disk_usage

    def fsync(fd):
        if state["full"] and os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
            raise error
        real_fsync(fd)

    def disk_usage(path):
        usage = real_usage(path)
        return usage._replace(free=12 * 2**20) if str(path).startswith(str(folder)) else usage

    monkeypatch.setattr(safety.os, "fsync", fsync)
    monkeypatch.setattr(safety.shutil, "disk_usage", disk_usage)
    return state


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
])
def test_full_disk_keeps_the_lora_in_memory_and_save_to_writes_it(tiny_sd1_dir, images, tmp_path, monkeypatch,  # noqa: F811
                                                                  error):
    straight = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "straight", epoch=2, save_every_n_steps=1))
    assert straight.status == "finished"
    out = tmp_path / "out"
    disk = fill_disk_after_first_save(monkeypatch, out, error)
    rec, control = Recorder(), Control()

    def sink(event):
        rec(event)
        disk["full"] |= isinstance(event, ev.Saved)

    result = train(tiny_settings(tiny_sd1_dir, images, out, epoch=2, save_every_n_steps=1), sink, control)
    assert result.status == "failed" and [os.path.basename(f) for f in result.files] == ["tiny-step00000001.safetensors"]
    (full,) = rec.of(ev.DiskFull)
    assert full.step == 2 and full.free_bytes == 12 * 2**20
    assert full.advice.startswith(f"The disk holding {out} has 12 MiB free: free some space or choose another folder")
    assert result.kept is control.kept_weights and result.kept.step == 2

    monkeypatch.undo()  # space on another disk
    path = control.save_kept_to(tmp_path / "elsewhere")
    assert path == str(tmp_path / "elsewhere" / "tiny-step00000002.safetensors")
    expected = load_file(str(tmp_path / "straight" / "tiny-step00000002.safetensors"))
    written = load_file(path)  # the weights of step 2, as the uninterrupted run saved them
    assert set(written) == set(expected)
    for key in expected:
        torch.testing.assert_close(written[key], expected[key])
    with safe_open(path, "pt") as f:
        assert f.metadata()["ss_steps"] == "2" and f.metadata()["ss_output_name"] == "tiny"


def test_cli_asks_where_to_save_what_a_full_disk_kept(tiny_sd1_dir, images, tmp_path, monkeypatch):  # noqa: F811
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    disk = fill_disk_after_first_save(monkeypatch, out, OSError(errno.ENOSPC, "No space left on device"))
    answers = iter([str(out), str(elsewhere / "rescued.safetensors")])  # the full disk again, then another

    class Printer(train_cmd.ProgressPrinter):
        def _on_Saved(self, e):
            super()._on_Saved(e)
            disk["full"] = True

    monkeypatch.setattr(train_cmd, "ProgressPrinter", Printer)
    stdout, stderr = io.StringIO(), io.StringIO()
    code = train_cmd.run(tiny_settings(tiny_sd1_dir, images, out, epoch=2, save_every_n_steps=1), stdout, stderr,
                         ask=lambda prompt: next(answers))
    assert code == train_cmd.EXIT_FAILED
    assert f"disk full: The disk holding {out} has 12 MiB free" in stderr.getvalue()
    assert f"saved: {elsewhere / 'rescued.safetensors'}" in stdout.getvalue()
    assert finite(elsewhere / "rescued.safetensors")


# ---- temp files of killed runs ---------------------------------------------------------------------

# `python -m trainer train`, killed (SIGKILL) just before its final LoRA is renamed into place.
KILLED_WHILE_SAVING = textwrap.dedent("""
    import os, signal, sys
    real_replace = os.replace

    def replace(source, target, **kw):
        if str(target).endswith("tiny.safetensors"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(source, target, **kw)

    os.replace = replace
    from trainer.cli import main
    sys.exit(main(["train", "--config", sys.argv[1]]))
""")


def test_the_next_run_removes_temp_files_of_killed_saves_only(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    config = save_settings(tiny_settings(tiny_sd1_dir, images, out), tmp_path / "c.json")
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(config)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    crashed = [p for p in out.iterdir() if p.name.startswith(".")]
    assert crashed and sum(p.stat().st_size for p in crashed) > 0  # the whole LoRA, left behind
    live = out / f".other.safetensors{safety.TEMP_TAG}{os.getpid()}-abc.tmp"  # another run saving right now
    live.write_bytes(b"being written")
    library_temp = out / ".tmpAb12Cd"  # safetensors' own temp name (older Nekoya), from a crash long ago
    library_temp.write_bytes(save({"w": torch.zeros(1)}))
    an_hour_ago = time.time() - 3600
    os.utime(library_temp, (an_hour_ago, an_hour_ago))

    rec = Recorder()
    assert train(tiny_settings(tiny_sd1_dir, images, out), rec).status == "finished"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [live.name]
    assert f"removed {len(crashed) + 1} temp file(s) of interrupted saves from {out}" in rec.logs()


# ---- file modes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_every_file_a_run_writes_follows_the_umask(tiny_sd1_dir, images, tmp_path, umask, mode):  # noqa: F811
    previous = os.umask(umask)
    try:
        result = train(tiny_settings(tiny_sd1_dir, images, tmp_path, epoch=2, save_every_n_steps=1, save_state=True))
    finally:
        os.umask(previous)
    assert result.status == "finished", result.error
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".safetensors", ".pt", ".json"}
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files} == {
        str(p.relative_to(tmp_path)): oct(mode) for p in files}
