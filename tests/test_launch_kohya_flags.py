"""launch.py takes every kohya_ss launch flag: --config pre-fills the form from kohya_ss's config.toml, the
others are answered with a line each; none ends the launch with an argparse error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import launch
from trainer.settings.gui_defaults import GuiDefaultsError, read_gui_defaults

EXAMPLE = Path(__file__).parent / "data" / "kohya_ss_gui_config" / "config example.toml"
KOHYA_FLAGS = ["--config", str(EXAMPLE), "--language", "zh-CN", "--noverify", "--use-ipex", "--use-rocm",
               "--do_not_use_shell", "--requirements", "requirements_linux.txt"]


def test_every_kohya_flag_parses_and_is_answered():
    args = launch.build_parser().parse_args(KOHYA_FLAGS)
    notes = launch.kohya_flag_notes(args)
    for flag in ("--language", "--noverify", "--use-ipex", "--use-rocm", "--do_not_use_shell", "--requirements"):
        assert any(line.startswith(flag) for line in notes), flag


def test_kohya_config_toml_prefills_what_nekoya_knows_and_names_the_rest():
    defaults = read_gui_defaults(EXAMPLE)
    s = defaults.settings
    assert (s.output_name, s.seed, s.save_precision, s.optimizer) == ("new model", 1234, "bf16", "AdamW8bit")
    assert "output_name" in defaults.applied and "seed" in defaults.applied
    assert {"models_dir", "config_dir", "use_shell", "allowed_paths"} <= set(defaults.ignored)


def test_a_missing_or_broken_config_toml_is_named(tmp_path):
    with pytest.raises(GuiDefaultsError, match="no such file"):
        read_gui_defaults(tmp_path / "nope.toml")
    broken = tmp_path / "config.toml"
    broken.write_text("[basic\nseed = 1")
    with pytest.raises(GuiDefaultsError, match="not a readable TOML file"):
        read_gui_defaults(broken)
    bad = tmp_path / "bad.toml"
    bad.write_text("[basic]\ntrain_batch_size = 0\n")
    with pytest.raises(GuiDefaultsError, match="train_batch_size"):
        read_gui_defaults(bad)
    assert launch.main(["--config", str(bad)]) == 2


@pytest.mark.slow
def test_the_gui_starts_with_every_kohya_flag_and_shows_the_config_defaults(tmp_path):
    from test_server_security import Server

    server = Server(tmp_path, KOHYA_FLAGS)
    try:
        config = server.request("GET", "/config").json()
        values = [c.get("props", {}).get("value") for c in config["components"]]
        assert "new model" in values and 1234 in values
    finally:
        server.stop()
    log = server.output.read_text()
    assert "--language zh-CN" in log and "pre-fill the form" in log
    assert "usage:" not in log  # no argparse error
