"""kohya_ss settings Nekoya keeps but does not use (Stop TE): hidden in the GUI, named in a note on
their tab, and their values still go through the form into saved configs."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
gr = pytest.importorskip("gradio")

from app.form import form_values  # noqa: E402
from app.presets import load_over_form, save_form  # noqa: E402
from app.widgets import build_settings_tabs  # noqa: E402
from trainer.settings import TrainingSettings, setting_info  # noqa: E402


@pytest.fixture(scope="module")
def page():
    with gr.Blocks() as demo:
        components = build_settings_tabs()
    return demo, components


def by_elem_id(demo, elem_id):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def test_stop_te_is_hidden_and_named_in_the_parameters_note(page):
    demo, components = page
    assert components["stop_text_encoder_training"].visible is False
    assert not setting_info("stop_text_encoder_training").is_visible({})
    note = by_elem_id(demo, "unused_parameters").value
    assert "Stop TE (% of total steps)" in note and "stop_text_encoder_training" in note
    assert "Text Encoder learning rate to 0" in note  # what to do instead
    assert all(c.visible is not False for k, c in components.items() if not setting_info(k).visible_when
               and k != "stop_text_encoder_training")


def test_a_kohya_stop_te_value_survives_the_form_into_the_saved_config(page, tmp_path):
    _, components = page
    config = tmp_path / "kohya.json"
    config.write_text(json.dumps({"stop_text_encoder_training_pct": 30, "network_dim": 16}))
    outcome = load_over_form(config, form_values(TrainingSettings()))
    assert outcome.ok and outcome.values["stop_text_encoder_training"] == 30
    widget = components["stop_text_encoder_training"]
    shown = dict(outcome.values)
    shown["stop_text_encoder_training"] = widget.preprocess(widget.postprocess(30))  # the hidden widget's round trip
    saved = json.loads(save_form(tmp_path / "out.json", shown, outcome.kept).read_text())
    assert saved["stop_text_encoder_training"] == 30 and saved["network_dim"] == 16
