"""The command-line contract: `python -m trainer config`, `launch.py --help` and its exposure rules."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import launch

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_config_prints_normalized_sorted_kohya_json(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"learning_rate": "1e-4", "network_dim": "16", "xformers": False, "foo": 1}))
    out = run("-m", "trainer", "config", str(cfg), "--set", "network_alpha=8")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert list(data) == sorted(data)
    assert (data["learning_rate"], data["network_dim"], data["network_alpha"], data["xformers"]) == (1e-4, 16, 8.0, "none")
    assert data["foo"] == 1 and "foo" in out.stderr  # kept, and reported


def test_config_exits_2_naming_every_bad_field(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"train_batch_size": 0, "optimizer_args": "x", "lr_scheduler": "weekly"}))
    out = run("-m", "trainer", "config", str(cfg))
    assert out.returncode == 2
    for key in ("train_batch_size", "optimizer_args", "lr_scheduler"):
        assert re.search(rf"^\s+- {key} ", out.stderr, re.M), out.stderr
    assert out.stdout == ""


def test_config_reports_a_missing_file_and_broken_json(tmp_path):
    assert "does not exist" in run("-m", "trainer", "config", str(tmp_path / "nope.json")).stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    out = run("-m", "trainer", "config", str(broken))
    assert out.returncode == 2 and "not valid JSON (line 1" in out.stderr


def test_launch_help_lists_kohya_flags():
    out = run("launch.py", "--help")
    assert out.returncode == 0
    for flag in ("--listen", "--server_port", "--inbrowser", "--share", "--headless", "--root_path", "--username", "--password"):
        assert flag in out.stdout


@pytest.mark.parametrize(
    "argv, refused",
    [
        ([], False),
        (["--listen", "127.0.0.1"], False),
        (["--listen", "0.0.0.0"], True),
        (["--listen", "0.0.0.0", "--username", "u", "--password", "p"], False),
        (["--listen", "0.0.0.0", "--allow-no-auth"], False),
        (["--share"], True),
        (["--share", "--do_not_share"], False),
        (["--username", "u"], True),
    ],
)
def test_exposing_the_gui_requires_a_login(argv, refused):
    args = launch.build_parser().parse_args(argv)
    assert bool(launch.exposure_problems(args)) == refused


def test_launch_refuses_public_listen_before_importing_the_app():
    out = run("launch.py", "--listen", "0.0.0.0")
    assert out.returncode == 2 and "--username and --password" in out.stderr


def test_trainer_never_imports_gradio_and_settings_stay_light():
    offenders = [
        str(p.relative_to(ROOT)) for p in (ROOT / "trainer").rglob("*.py")
        if re.search(r"^\s*(import gradio|from gradio)", p.read_text(), re.M)
    ]
    assert offenders == []
    code = "import sys, trainer.settings, trainer.cli; print('torch' in sys.modules, 'gradio' in sys.modules)"
    assert run("-c", code).stdout.split() == ["False", "False"]
