"""Print training command: the button writes the form as a config file and shows the command line; that
line, run in a shell as a user would paste it, trains the tiny model with the same settings."""
from __future__ import annotations

import html
import json
import os
import re
import subprocess
from datetime import datetime

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
gr = pytest.importorskip("gradio")

from gui_app_support import component, fresh_app, run_handlers  # noqa: E402
from test_train_cmd import settings_dict  # noqa: E402

from app.form import form_values, settings_from_form  # noqa: E402
from app.train_command import print_train_command  # noqa: E402
from trainer import cli  # noqa: E402
from trainer.settings import TrainingSettings, settings_to_json  # noqa: E402


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return fresh_app(tmp_path_factory.mktemp("presets"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from trainer.devtools.synthetic import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("cmd_images") / "img", {"1_sks dog": 2}, sizes=[(64, 64)], seed=5)


def form_of(model, images, out, **overrides) -> dict:
    return form_values(TrainingSettings(**settings_dict(model, images, out, output_name="from_gui", **overrides)))


def press(app, values: dict, target: str = "") -> str:
    """Press the button with the form holding ``values``; the page's message."""
    overrides = {component(app, f"setting_{k}"): v for k, v in values.items()}
    overrides[component(app, "print_command_file")] = target
    (result,) = run_handlers(app, component(app, "print_command"), "click", overrides)
    return result


@pytest.mark.slow
def test_the_printed_command_trains_with_the_form_settings(app, tiny_sd1_dir, images, tmp_path):
    out = tmp_path / "out"
    values = form_of(tiny_sd1_dir, images, out)
    message = press(app, values)
    config = out / re.search(r"from_gui_\d{8}-\d{6}\.json", message).group(0)
    assert f"Wrote {config}" in message
    shown = html.unescape(re.search(r"<pre[^>]*>(.*?)</pre>", message, re.S).group(1))  # the command box
    train_line = next(line for line in shown.splitlines() if " -m trainer train --config " in line)
    expected = settings_to_json(settings_from_form(values))
    assert config.read_text(encoding="utf-8") == expected
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(train_line, shell=True, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "from_gui.safetensors").is_file()
    assert "finished after 2 steps" in run.stdout


def test_the_config_file_reads_back_as_the_form(tiny_sd1_dir, images, tmp_path, capsys):
    values = form_of(tiny_sd1_dir, images, tmp_path / "out", network_dim=6, network_alpha=3)
    result = print_train_command(values, {"some_kohya_key": 1}, target=str(tmp_path / "mine"))
    assert result.config == tmp_path / "mine.json"
    assert cli.main(["config", str(result.config)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(settings_to_json(settings_from_form(values, {"some_kohya_key": 1})))
    assert printed["network_dim"] == 6 and printed["some_kohya_key"] == 1


def test_a_second_press_never_overwrites(tiny_sd1_dir, images, tmp_path):
    values = form_of(tiny_sd1_dir, images, tmp_path / "out")
    now = datetime(2025, 1, 2, 3, 4, 5)
    first = print_train_command(values, {}, now=now).config
    second = print_train_command(values, {}, now=now).config
    assert (first.name, second.name) == ("from_gui_20250102-030405.json", "from_gui_20250102-030405-2.json")
    typed = tmp_path / "taken.json"
    typed.write_text("mine")
    with pytest.raises(FileExistsError, match="taken.json already exists"):
        print_train_command(values, {}, target=str(typed))
    assert typed.read_text() == "mine"
    assert {p.name for p in (tmp_path / "out").iterdir()} == {first.name, second.name}  # no temporary left


def test_refusals_name_what_to_fix(app, tiny_sd1_dir, images, tmp_path):
    no_output = press(app, form_of(tiny_sd1_dir, images, ""))
    assert "No command printed" in no_output and "Output folder" in no_output
    bad = press(app, {**form_of(tiny_sd1_dir, images, tmp_path / "out"), "network_dim": 0})
    assert "No command printed" in bad and "network_dim" in bad
    assert not (tmp_path / "out").exists()


def test_a_run_on_several_machines_prints_what_each_machine_runs(app, tiny_sd1_dir, images, tmp_path):
    values = form_of(tiny_sd1_dir, images, tmp_path / "out", num_processes=4, num_machines=2, main_process_port=29400)
    shown = html.unescape(press(app, values))
    config = re.search(r"Wrote (\S+\.json)", shown).group(1)
    assert (f"torchrun --nnodes 2 --nproc_per_node 2 --node_rank R --rdzv-backend c10d --rdzv-endpoint HOST:29400 "
            f"-m trainer train --config {config}") in shown
