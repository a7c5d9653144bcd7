"""The 📂/📄 pickers next to path fields, through the app's own handlers: they list the allowed roots and
their folders, never anything outside them (``..`` and symlinks resolved), and Choose fills the field."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
gr = pytest.importorskip("gradio")

from gui_app_support import component, fresh_app, run_handlers  # noqa: E402

from app.path_picker import ROOTS_ENV, browse_roots  # noqa: E402
from app.widgets import PATH_KINDS  # noqa: E402
from trainer.settings import setting_infos  # noqa: E402


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return fresh_app(tmp_path_factory.mktemp("presets"))


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """An allowed root with folders, files, a dotfile and a symlink out of it; a secret folder outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder in (root / "data" / "10_sks dog", root / "models", outside):
        folder.mkdir(parents=True)
    (root / "models" / "lora.safetensors").write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    (root / ".hidden").write_text("x")
    (outside / "secret.txt").write_text("x")
    (root / "escape").symlink_to(outside)
    monkeypatch.setenv(ROOTS_ENV, str(root))
    return root.resolve(), outside.resolve()


class Picker:
    """One path field's picker on the page: its widgets and what pressing them does."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key
        self.field = component(app, f"setting_{key}")
        self.folder, self.entries = component(app, f"setting_{key}_folder"), component(app, f"setting_{key}_entries")
        self.note = component(app, f"setting_{key}_picker_note")

    def call(self, elem_id: str, event: str, **values):
        overrides = {getattr(self, name): value for name, value in values.items()}
        (result,) = run_handlers(self.app, component(self.app, f"setting_{self.key}_{elem_id}"), event, overrides)
        return result

    def view(self, result) -> tuple[str, list[str], str]:
        """(open folder, entry labels, note) after an event."""
        _, folder, entries, note = result
        return folder["value"], [label for label, _ in entries["choices"]], note


def test_every_path_setting_has_a_picker(app):
    for info in setting_infos():
        if info.widget in PATH_KINDS:
            assert component(app, f"setting_{info.key}_browse").value == ("📂" if info.widget == "folder" else "📄")


def test_opening_lists_the_roots_then_a_root_lists_its_folders(app, tree):
    root, _ = tree
    picker = Picker(app, "train_data_dir")
    folder, entries, _ = picker.view(picker.call("browse", "click", field=""))
    assert (folder, entries) == ("", [f"📁 {root}"])
    folder, entries, note = picker.view(picker.call("folder", "input", folder=str(root)))
    assert (folder, entries, note) == (str(root), ["📁 data/", "📁 models/"], "")  # folders only, no dotfile, no escape
    files = Picker(app, "network_weights")
    _, entries, _ = files.view(files.call("folder", "input", folder=str(root)))
    assert entries == ["📁 data/", "📁 models/", "📄 notes.txt"]


@pytest.mark.parametrize("where", ["outside", "root/../outside", "root/escape", "/"])
def test_folders_outside_the_roots_are_refused(app, tree, where):
    root, outside = tree
    typed = str(root.parent / where) if where != "/" else "/"
    picker = Picker(app, "output_dir")
    folder, entries, note = picker.view(picker.call("folder", "input", folder=typed))
    assert (folder, entries) == ("", [f"📁 {root}"]) and "not a folder you can browse" in note
    assert "secret" not in str(picker.call("up", "click", folder=typed))


def test_choosing_fills_the_field(app, tree):
    root, outside = tree
    picker = Picker(app, "train_data_dir")
    result = picker.call("entries", "input", folder=str(root), entries=str(root / "data"))  # opens it
    assert picker.view(result)[:2] == (str(root / "data"), ["📁 10_sks dog/"])
    value, panel, note = picker.call("choose", "click", folder=str(root / "data"), entries=None)
    assert value == str(root / "data") and panel["visible"] is False and note == ""
    files = Picker(app, "network_weights")
    value, _, _ = files.call("choose", "click", folder=str(root / "models"), entries=str(root / "models" / "lora.safetensors"))
    assert value == str(root / "models" / "lora.safetensors")
    refused, _, note = files.call("choose", "click", folder=str(root), entries=None)  # a folder for a file field
    assert not isinstance(refused, str) and "takes a file" in note
    escaped, _, note = picker.call("choose", "click", folder=str(root), entries=str(root / "escape"))
    assert not isinstance(escaped, str) and "outside the folders" in note


def test_the_default_roots_are_home_nekoya_and_typed_folders(tmp_path, monkeypatch):
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    typed_file = tmp_path / "models" / "base.safetensors"
    typed_file.parent.mkdir()
    typed_file.write_bytes(b"x")
    roots = browse_roots([str(typed_file), "", str(tmp_path / "missing")])
    assert roots == [Path.home().resolve(), Path(__file__).resolve().parent.parent, typed_file.parent.resolve()]
