"""``python -m trainer train``: progress bar, exit codes, Ctrl+C stops cleanly."""
from __future__ import annotations

import os
import signal

import pytest

from trainer import cli
from trainer.commands import train_cmd
from trainer.settings import TrainingSettings, save_settings

pytestmark = pytest.mark.slow  # runs the trainer command on a tiny model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from trainer.devtools.synthetic import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("cmd_images") / "img", {"2_sks dog": 2}, sizes=[(64, 64)], seed=5)


def settings_dict(model, images, out, **overrides) -> dict:
    values = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(images), output_dir=str(out), output_name="cli",
        max_resolution="64,64", enable_bucket=False, learning_rate=1e-3, unet_lr=1e-3, text_encoder_lr=0,
        optimizer="AdamW", lr_scheduler="constant", lr_warmup=0, network_dim=2, network_alpha=1, seed=1, epoch=1,
        save_every_n_epochs=0, mixed_precision="no",
    )
    values.update(overrides)
    return values


def write_config(path, model, images, out, **overrides):
    return save_settings(TrainingSettings(**settings_dict(model, images, out, **overrides)), path)


def test_train_command_runs_and_lists_files(tiny_sd1_dir, images, tmp_path, capsys):
    config = write_config(tmp_path / "config.json", tiny_sd1_dir, images, tmp_path / "out")
    code = cli.main(["train", "--config", str(config), "--set", "epoch=2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert os.path.isfile(tmp_path / "out" / "cli.safetensors")
    assert "finished after 8 steps" in captured.out and "cli.safetensors" in captured.out
    assert "loss=" in captured.err and "8/8" in captured.err  # the tqdm bar and its postfix


def test_train_command_failure_exit_code_and_message(tiny_sd1_dir, images, tmp_path, capsys):
    config = write_config(tmp_path / "config.json", tiny_sd1_dir, tmp_path / "missing", tmp_path / "out")
    code = cli.main(["train", "--config", str(config)])
    captured = capsys.readouterr()
    assert code == train_cmd.EXIT_FAILED
    assert "error:" in captured.err and "train_data_dir" in captured.err


def test_ctrl_c_stops_cleanly_and_saves(tiny_sd1_dir, images, tmp_path, capsys, monkeypatch):
    original = train_cmd.ProgressPrinter._on_Step

    def interrupt_at_step_two(self, event):
        original(self, event)
        if event.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends on Ctrl+C

    monkeypatch.setattr(train_cmd.ProgressPrinter, "_on_Step", interrupt_at_step_two)
    settings = TrainingSettings(**settings_dict(tiny_sd1_dir, images, tmp_path / "out"))
    previous_handler = signal.getsignal(signal.SIGINT)
    code = train_cmd.run(settings)
    captured = capsys.readouterr()
    assert code == train_cmd.EXIT_STOPPED
    assert "stopped at step 2" in captured.out
    assert os.path.isfile(tmp_path / "out" / "cli-step00000002.safetensors")
    assert signal.getsignal(signal.SIGINT) is previous_handler  # handler restored


@pytest.mark.parametrize("family_fixture", ["tiny_sd1_dir", "tiny_sdxl_file"])
def test_a_training_run_imports_no_diffusers_or_transformers(request, family_fixture, images, tmp_path):
    """Start-up cost: the CLI trains on Nekoya's lean models (trainer.models), so a run from a diffusers
    folder or an SDXL single file never imports diffusers, transformers, peft or accelerate, nor torch._dynamo
    (1.3-1.8 s, which torch.optim would import for compile guards that protect nothing here)."""
    import json
    import subprocess
    import sys

    model = request.getfixturevalue(family_fixture)
    extra = {"sdxl": True} if "sdxl" in family_fixture else {}
    config = write_config(tmp_path / "config.json", model, images, tmp_path / "out", text_encoder_lr=1e-4, **extra)
    probe = (
        "import json, sys\n"
        "from trainer import cli\n"
        f"code = cli.main(['train', '--config', {str(config)!r}])\n"
        "heavy = sorted(m for m in ('diffusers', 'transformers', 'peft', 'accelerate', 'gradio', 'torch._dynamo') if m in sys.modules)\n"
        "print('PROBE', json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next(line for line in done.stdout.splitlines() if line.startswith("PROBE"))
    result = json.loads(line.split(" ", 1)[1])
    assert result == {"code": 0, "heavy": []}, done.stderr[-2000:]
    assert os.path.isfile(tmp_path / "out" / "cli.safetensors")
