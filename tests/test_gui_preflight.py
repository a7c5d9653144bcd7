"""The main preflight problems, as the GUI shows them (the same check the CLI runs)."""
from __future__ import annotations

import pytest

from app.checks import check_form
from app.form import form_values
from app.plan_panel import plan_html
from trainer.settings import TrainingSettings


@pytest.fixture()
def values(image_folder, tmp_path):
    settings = TrainingSettings(train_data_dir=str(image_folder), output_dir=str(tmp_path / "out"), model_list="custom")
    return form_values(settings)


def test_a_leaf_image_folder_is_named_with_the_fix(values, image_folder):
    leaf = next(p for p in image_folder.iterdir() if p.is_dir())
    values["train_data_dir"] = str(leaf)
    result = check_form(values)
    assert not result.ok
    page = plan_html(values)
    assert "Folders › Image folder" in page and "parent" in page


def test_a_model_of_another_family_is_refused_naming_the_checkbox(values, tiny_sd2_file):
    values["pretrained_model_name_or_path"] = str(tiny_sd2_file)
    result = check_form(values)
    assert not result.ok
    fields = {p.field for p in result.errors}
    assert fields & {"v2", "pretrained_model_name_or_path"}
    assert "v2" in plan_html(values)


def test_adafactor_with_warmup_is_adjusted_with_a_note(values, tiny_sd1_dir):
    values.update(pretrained_model_name_or_path=str(tiny_sd1_dir), optimizer="Adafactor", lr_warmup=10)
    result = check_form(values)
    assert result.ok  # handled for the user, not refused
    notes = [p for p in result.problems if p.field in ("lr_warmup", "lr_scheduler")]
    assert notes and all(p.severity == "note" for p in notes)
    assert any("warmup" in p.message.lower() for p in notes)
    assert "warmup" in plan_html(values).lower()
