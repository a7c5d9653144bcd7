"""State folders under faults: a folder mixing two saves is refused by name; a save killed at any
point leaves the old folder or the new one whole, and the next run puts it in place (CPU, tiny SD1)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_train import Recorder, images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer import cli
from trainer import events as ev
from trainer.loop import train
from trainer.settings import save_settings
from trainer.state_folder import check_state_folder

pytestmark = pytest.mark.slow  # trains tiny models, some in a subprocess

REPO = Path(__file__).resolve().parents[1]


def test_resume_refuses_a_state_folder_mixing_two_saves(tiny_sd1_dir, images, tmp_path, capsys):  # noqa: F811
    for name, epochs in (("a", 1), ("b", 2)):
        result = train(tiny_settings(tiny_sd1_dir, images, tmp_path / name, epoch=epochs, save_state=True))
        assert result.status == "finished", result.error
    state = tmp_path / "a" / "tiny-state"
    # what a kill -9 during an in-place overwrite left: the new weights beside the old optimizer/RNG/step
    shutil.copy(tmp_path / "b" / "tiny-state" / "lora.safetensors", state / "lora.safetensors")

    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "c", epoch=3, resume=str(state))
    rec = Recorder()
    result = train(settings, rec)
    assert result.status == "failed" and result.field == "resume"
    (error,) = rec.of(ev.Error)
    assert str(state / "lora.safetensors") in error.message and "mixes files from different saves" in error.message
    assert "Resume" in error.message + (error.hint or "") and not rec.of(ev.Started)

    config = save_settings(settings, tmp_path / "config.json")
    assert cli.main(["check", "--config", str(config)]) == 1
    assert str(state / "lora.safetensors") in capsys.readouterr().out


# Runs `python -m trainer train` and kills it (SIGKILL, as a power cut would) at one point of the
# state save: "writing" once the new weights file is written, "swapping" once the old folder is moved.
CRASHING_TRAIN = textwrap.dedent("""
    import os, signal, sys
    crash_at, config = sys.argv[1], sys.argv[2]
    real_replace, real_rename = os.replace, os.rename

    def replace(source, target, **kw):
        real_replace(source, target, **kw)
        if crash_at == "writing" and "tiny-state" in str(target) and str(target).endswith("lora.safetensors"):
            os.kill(os.getpid(), signal.SIGKILL)

    def rename(source, target, **kw):
        real_rename(source, target, **kw)
        if crash_at == "swapping" and str(source).endswith("tiny-state"):
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace, os.rename = replace, rename
    from trainer.cli import main
    sys.exit(main(["train", "--config", config]))
""")


@pytest.mark.parametrize("crash_at, resumed_step", [("writing", 2), ("swapping", 4)])
def test_state_save_killed_midway_leaves_a_whole_folder(tiny_sd1_dir, images, tmp_path, crash_at, resumed_step):  # noqa: F811
    out = tmp_path / "out"
    first = train(tiny_settings(tiny_sd1_dir, images, out, epoch=1, save_state=True))
    assert first.status == "finished", first.error
    state = out / "tiny-state"
    old_weights = (state / "lora.safetensors").read_bytes()

    config = save_settings(tiny_settings(tiny_sd1_dir, images, out, epoch=2, save_state=True), tmp_path / "c.json")
    killed = subprocess.run([sys.executable, "-c", CRASHING_TRAIN, crash_at, str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    if crash_at == "writing":  # the folder in place is the old one, whole
        assert check_state_folder(state) is None
        assert (state / "lora.safetensors").read_bytes() == old_weights

    rec = Recorder()
    resumed = train(tiny_settings(tiny_sd1_dir, images, out, epoch=3, resume=str(state)), rec)
    assert resumed.status == "finished", resumed.error
    assert rec.of(ev.Started)[0].start_step == resumed_step  # the old save (2) or the new one (4), whole
    assert sorted(p.name for p in out.iterdir() if "-state" in p.name) == ["tiny-state"]  # no leftovers
    assert check_state_folder(state) is None
