"""The Configuration panel's handlers as plain Python: Save keeps names in the presets folder, asks before
replacing a preset, never replaces a file that is not a config, writes with normal file modes; picking a
preset loads it and "Load again" says honestly what it did."""
from __future__ import annotations

import json
import os
import stat

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
pytest.importorskip("gradio")

from app.form import form_values  # noqa: E402
from app.presets import USER_PREFIX, PresetFolders, load_preset, save_preset  # noqa: E402
from trainer.settings import TrainingSettings  # noqa: E402


@pytest.fixture
def defaults():
    return form_values(TrainingSettings())


@pytest.fixture
def folders(tmp_path):
    shipped = tmp_path / "presets"
    shipped.mkdir()
    (shipped / "Small net.json").write_text(json.dumps({"network_dim": 4, "network_alpha": 2}))
    return PresetFolders(shipped=shipped, user=shipped / "user")


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("name", [".", "..", "../x", "../../etc/x", "user/../x", "sub/x", "a\\b", "x.", ".hidden",
                                  "", "  ", "a|b", "con", "~"])
def test_save_refuses_names_outside_the_presets_folder(folders, defaults, tmp_path, monkeypatch, name):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # "~" must not write next to the real home folder
    monkeypatch.chdir(tmp_path / "presets")  # nor a relative name into the working folder
    before = files_under(tmp_path)
    outcome = save_preset(folders, name, defaults)
    assert not outcome.ok and outcome.pending is None
    assert any(line.startswith("Save as:") for line in outcome.problems), outcome.problems
    assert files_under(tmp_path) == before  # nothing written, no folder created


@pytest.mark.parametrize("name, file", [("my_run", "my_run.json"), ("my_run.json", "my_run.json"),
                                        ("my.run", "my.run.json"), ("user/mine", "mine.json")])
def test_save_puts_a_plain_name_in_the_user_presets_folder(folders, defaults, name, file):
    outcome = save_preset(folders, name, {**defaults, "network_dim": 24})
    assert outcome.ok, outcome.problems
    assert outcome.messages == [f"Saved {folders.user / file}"]
    assert json.loads((folders.user / file).read_text())["network_dim"] == 24


def test_save_to_a_full_path_needs_its_folder(folders, defaults, tmp_path):
    missing = tmp_path / "no such folder" / "run.json"
    outcome = save_preset(folders, str(missing), defaults)
    assert not outcome.ok and f"the folder {missing.parent} does not exist" in outcome.problems[0]
    assert not missing.parent.exists()
    assert save_preset(folders, str(tmp_path / "run"), defaults).ok
    assert json.loads((tmp_path / "run.json").read_text())["network_dim"] == defaults["network_dim"]


def test_save_over_an_existing_preset_asks_first(folders, defaults):
    assert save_preset(folders, "mine", {**defaults, "network_dim": 8}).ok
    first = save_preset(folders, "mine", {**defaults, "network_dim": 32})
    target = folders.user / "mine.json"
    assert not first.ok and first.warnings == [f"{target} exists; press Save again to replace it."]
    assert json.loads(target.read_text())["network_dim"] == 8  # untouched until confirmed
    other = save_preset(folders, "other", defaults, confirmed=first.pending)  # a confirmation is for that file only
    assert other.ok
    again = save_preset(folders, "mine", {**defaults, "network_dim": 32}, confirmed=first.pending)
    assert again.ok and again.messages == [f"Replaced {target}"] and again.pending is None
    assert json.loads(target.read_text())["network_dim"] == 32


@pytest.mark.parametrize("content, reason", [
    ('{"name": "web", "version": "1.0.0", "scripts": {}}', "without any kohya_ss setting"),
    ('[{"network_dim": 8}]', "holds a JSON list"),
    ("not json at all", "is not valid JSON"),
    ("", "is not valid JSON"),
])
def test_save_never_replaces_a_file_that_is_not_a_config(folders, defaults, tmp_path, content, reason):
    other = tmp_path / "package.json"
    other.write_text(content)
    for confirmed in (None, str(other)):  # not even when "confirmed"
        outcome = save_preset(folders, str(other), defaults, confirmed=confirmed)
        assert not outcome.ok and outcome.pending is None
        assert reason in outcome.problems[0] and "Save never replaces such a file" in outcome.problems[0]
    assert other.read_text() == content


def test_save_never_replaces_a_folder(folders, defaults, tmp_path):
    (tmp_path / "dir.json").mkdir()
    outcome = save_preset(folders, str(tmp_path / "dir.json"), defaults, confirmed=str(tmp_path / "dir.json"))
    assert not outcome.ok and "is a folder" in outcome.problems[0]


def test_invalid_form_is_not_saved_and_asks_nothing(folders, defaults):
    outcome = save_preset(folders, "broken", {**defaults, "network_dim": 0})
    assert not outcome.ok and outcome.problems[0] == "Not saved: fix these first."
    assert "network_dim" in outcome.problems[1]
    assert not (folders.user / "broken.json").exists()


def test_saved_preset_has_a_normal_file_mode_and_no_temp_files(folders, defaults):
    umask = os.umask(0o022)
    os.umask(umask)
    assert save_preset(folders, "mode", defaults).ok
    path = folders.user / "mode.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert files_under(folders.user) == ["mode.json"]


def test_picking_loads_then_load_again_says_what_it_did(folders, defaults):
    picked = load_preset(folders, "Small net", defaults)
    assert picked.ok and picked.messages[0].startswith("Loaded 'Small net': 2 setting(s) changed")
    same = load_preset(folders, "Small net", picked.values, again=True)
    assert same.messages == ["Loaded 'Small net' again: the form still has all its values "
                             "(picking a preset loads it; Load again re-applies it after edits)."]
    edited = {**picked.values, "network_dim": 64}
    reapplied = load_preset(folders, "Small net", edited, again=True)
    assert reapplied.values["network_dim"] == 4
    assert reapplied.messages == ["Loaded 'Small net' again: 1 setting(s) changed: Network Rank (Dimension) 64 → 4."]


def test_load_without_a_pick_and_a_user_preset_label(folders, defaults):
    assert load_preset(folders, None, defaults).problems == ["Pick a preset first."]
    assert save_preset(folders, "mine", {**defaults, "network_dim": 12}).ok
    outcome = load_preset(folders, USER_PREFIX + "mine", defaults)
    assert outcome.values["network_dim"] == 12 and outcome.messages[0].startswith("Loaded 'user/mine': ")
