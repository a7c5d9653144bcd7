"""Weights & Biases logging (issue #16): log_with = wandb/all, kohya_ss's wandb_run_name, log_tracker_name,
log_tracker_config and wandb_api_key; offline unless asked, its run folder under the Logging folder.

The history of an offline run is read back from its ``run-<id>.wandb`` file (a LevelDB-style log of
wandb's protobuf records), so the test sees exactly what ``wandb sync`` would upload.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.preflight import check
from trainer.settings.kohya_json import settings_from_dict
from trainer.wandb_log import DEFAULT_PROJECT, INSTALL_COMMAND, WandbPlan

OFFLINE = {"WANDB_MODE": ""}  # an environment that asks for nothing


def _settings(**values):
    return settings_from_dict({"output_name": "tiny", **values}).settings


def _problems(settings, field, severity=None, deep=True):
    report = check(settings, deep=deep, checks=["output.wandb_log", "output.tensorboard_log"])
    return [p for p in report.problems if p.field == field and severity in (None, p.severity)]


# --- what the run does: decided before loading -----------------------------------------------------------------

def test_offline_by_default_named_as_kohya_ss_names_it():
    plan = WandbPlan.of(_settings(log_with="wandb", wandb_api_key="k" * 40), OFFLINE)
    assert (plan.mode, plan.project, plan.name, plan.api_key) == ("offline", DEFAULT_PROJECT, "tiny", "")
    plan = WandbPlan.of(_settings(log_with="wandb", wandb_run_name="run 1", log_tracker_name="proj"), OFFLINE)
    assert (plan.project, plan.name) == ("proj", "run 1")


def test_online_needs_both_the_explicit_switch_and_a_key(tmp_path):
    key = {"wandb_api_key": "k" * 40}
    assert WandbPlan.of(_settings(log_with="wandb", **key), {"WANDB_MODE": "online"}).mode == "online"
    assert WandbPlan.of(_settings(log_with="wandb"), {"WANDB_MODE": "online", "WANDB_API_KEY": "x"}).api_key == "x"
    asked = WandbPlan.of(_settings(log_with="wandb"), {"WANDB_MODE": "online"})
    assert asked.mode == "offline" and asked.asked_online_without_key
    toml = tmp_path / "tracker.toml"
    toml.write_text('[wandb]\nmode = "online"\ntags = ["a", "b"]\nname = "from toml"\n')
    plan = WandbPlan.of(_settings(log_with="wandb", log_tracker_config=str(toml), **key), OFFLINE)
    assert plan.mode == "online" and plan.init_args == {"tags": ["a", "b"], "name": "from toml"}


# --- the check names the problems before loading ------------------------------------------------------------------

def test_wandb_not_installed_is_an_error_with_the_install_command(monkeypatch):
    monkeypatch.setattr("trainer.preflight.logging_check.wandb_installed", lambda: False)
    [error] = _problems(_settings(log_with="all", logging_dir="/tmp/x"), "log_with", "error", deep=False)
    assert "needs the wandb package" in error.message and INSTALL_COMMAND in error.fix
    assert not _problems(_settings(log_with="tensorboard", logging_dir="/tmp/x"), "log_with", "error")


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    ("[wandb\nname = 1", "is not valid TOML"),
    ("wandb = 3", "wandb must be a table"),
    ('[wandb]\nnot_an_init_argument = 1\ntags = ["x"]', "wandb.init takes no not_an_init_argument"),
])
def test_a_bad_tracker_config_is_an_error_naming_the_field(tmp_path, content, words):
    path = tmp_path / "tracker.toml"
    if content is not None:
        path.write_text(content)
    [error] = _problems(_settings(log_with="wandb", log_tracker_config=str(path)), "log_tracker_config", "error")
    assert words in error.message and str(path) in error.message and error.file == str(path)


def test_a_good_tracker_config_and_the_offline_note(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    path = tmp_path / "tracker.toml"
    path.write_text('[wandb]\ntags = ["x"]\nnotes = "n"\n[tensorboard]\nflush_secs = 5\n')
    settings = _settings(log_with="wandb", log_tracker_config=str(path), logging_dir=str(tmp_path / "logs"))
    assert not _problems(settings, "log_tracker_config")
    [note] = _problems(settings, "log_with", "note")
    assert "written offline to" in note.message and str(tmp_path / "logs") in note.message and "wandb sync" in note.message


def test_online_asked_without_a_key_warns_and_stays_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    [warning] = _problems(_settings(log_with="wandb"), "wandb_api_key", "warning")
    assert "no API key" in warning.message and "offline" in warning.message


def test_tensorboard_asked_for_without_a_logging_folder_warns():
    [warning] = _problems(_settings(log_with="tensorboard"), "logging_dir", "warning")
    assert "no TensorBoard logs" in warning.message
    assert not _problems(_settings(log_with=""), "logging_dir")


def test_log_with_wandb_is_applied_not_warned():
    report = check(_settings(log_with="wandb", wandb_run_name="r", log_tracker_name="p"), deep=False)
    assert not [p for p in report.warnings if p.field in ("log_with", "wandb_run_name", "log_tracker_name")]


# --- an offline run writes its run folder -----------------------------------------------------------------------

BLOCK = 32768  # the .wandb file: a 7-byte header, then records in 32 KiB blocks, each chunk with a 7-byte header


def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, record = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        record = chunk if kind in (1, 2) else record + chunk  # full/first start a record, middle/last go on
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed


def history(run_file: Path) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]


def offline_run(logging_dir: Path) -> Path:
    """The one offline-run folder under ``<logging_dir>/<name><time>/wandb``."""
    [run] = list(logging_dir.glob("*/wandb/offline-run-*"))
    return run


@pytest.mark.slow  # starts wandb's service process
def test_the_run_loggers_fan_out_to_tensorboard_and_wandb(tmp_path):
    pytest.importorskip("wandb")
    from trainer.tb_log import RunLoggers, open_log

    settings = _settings(log_with="all", logging_dir=str(tmp_path / "logs"), output_dir=str(tmp_path / "out"),
                         log_tracker_name="proj", wandb_run_name="")
    log = open_log(settings.logging_dir, settings.output_name, settings)
    assert isinstance(log, RunLoggers) and log.folder.startswith(str(tmp_path / "logs" / "tiny"))
    (tmp_path / "out" / "sample").mkdir(parents=True)
    log.step(1, 0.5, 0.5, {"unet": 1e-4, "textencoder": 1e-5})
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "out" / "sample" / "tiny_000001_00_x.png")
    log.step(2, 0.3, 0.4, {"unet": 1e-4, "textencoder": 1e-5})
    log.epoch(1, 0.4)
    log.close()
    run = offline_run(tmp_path / "logs")
    assert list(Path(log.folder).glob("events.out.tfevents.*"))  # TensorBoard in the same run folder
    rows = history(next(run.glob("run-*.wandb")))
    assert [r["_step"] for r in rows] == [1, 2]
    assert rows[0]["loss/current"] == 0.5 and rows[1]["loss/average"] == 0.4 and rows[1]["lr/textencoder"] == 1e-5
    assert rows[1]["loss/epoch"] == 0.4 and rows[1]["epoch"] == 1
    samples = {k.split("/", 1)[1]: v for k, v in rows[1].items() if k.startswith("samples/")}  # nested keys, flattened
    assert samples["count"] == 1 and samples["captions"] == ["tiny_000001_00_x"] and "samples/count" not in rows[0]
    assert list((run / "files" / "media" / "images").glob("samples_*.png"))
    [project] = [r.run.project for r in wandb_records(next(run.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "run"]
    assert project == "proj"


@pytest.mark.slow  # trains a tiny model
def test_an_offline_wandb_run_of_a_tiny_model_writes_its_history(tiny_sd1_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from test_train import tiny_settings

    from trainer import loop
    from trainer.devtools.synthetic import make_image_folder

    monkeypatch.delenv("WANDB_MODE", raising=False)
    images = make_image_folder(tmp_path / "img", {"1_sks dog": 2}, sizes=[(64, 64)], seed=3)
    logs = tmp_path / "logs"
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", log_with="wandb", logging_dir=str(logs))
    result = loop.train(settings)
    assert result.status == "finished" and result.step == 2
    run = offline_run(logs)
    rows = history(next(run.glob("run-*.wandb")))
    assert [r["_step"] for r in rows] == [1, 2] and all("loss/current" in r and "lr/unet" in r for r in rows)
    assert rows[-1]["epoch"] == 1 and "loss/epoch" in rows[-1]
    assert not list(logs.glob("*/events.out.tfevents.*"))  # log_with wandb: no TensorBoard, as sd-scripts


@pytest.mark.slow  # a subprocess with wandb's service process
def test_an_offline_wandb_log_opens_no_connection_to_another_machine(tmp_path):
    pytest.importorskip("wandb")
    from test_no_network import REPO, guarded_environment, network_attempts

    script = (
        "import sys\n"
        "from trainer.settings.kohya_json import settings_from_dict\n"
        "from trainer.tb_log import open_log\n"
        "s = settings_from_dict({'log_with': 'wandb', 'logging_dir': sys.argv[1], 'output_name': 'n'}).settings\n"
        "log = open_log(s.logging_dir, s.output_name, s)\n"
        "log.step(1, 0.5, 0.5, {'unet': 1e-4}); log.epoch(1, 0.5); log.close()\n"
    )
    socket_log = tmp_path / "sockets.log"
    env = {k: v for k, v in guarded_environment(socket_log).items() if not k.startswith("WANDB_")}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "logs")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert offline_run(tmp_path / "logs").is_dir()
    assert network_attempts(socket_log) == ""
