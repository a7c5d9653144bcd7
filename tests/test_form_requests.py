"""Try it, regularisation images and folder preparation: each form option is declared once; the
widgets and the trainer functions' defaults come from that declaration."""
from __future__ import annotations

import inspect
from dataclasses import MISSING, fields

import gradio as gr
import pytest

from app.tab_dataset import build_dataset_tab
from app.tab_tryit import build_tryit_tab
from trainer.dataset_prep import prepare_training_folders
from trainer.dataset_prep.requests import PrepareRequest
from trainer.inference.reg_images import generate_reg_images
from trainer.inference.requests import RegImagesRequest, TryItRequest
from trainer.inference.tryit import GenerateRequest
from trainer.settings.field import request_infos


def build(builder):
    with gr.Blocks():
        return builder()


def test_tryit_widgets_and_generate_request_share_the_declared_defaults():
    tab, declared = build(build_tryit_tab), TryItRequest()
    request_defaults = {f.name: f.default for f in fields(GenerateRequest) if f.default is not MISSING}
    for name, info in request_infos(TryItRequest).items():
        widget = tab.fields[name]
        assert (widget.value, widget.label) == (getattr(declared, name), info.label), name
        assert request_defaults.get(name, "") == getattr(declared, name), name  # the base model: none, an empty box
    assert tab.fields["weight_b"].value == declared.weight and tab.fields["sampler"].choices


def test_reg_and_prepare_widgets_and_functions_share_the_declared_defaults():
    tab = build(build_dataset_tab)
    reg, prep = RegImagesRequest(), PrepareRequest()
    for name in ("total", "width", "height", "steps", "sampler"):
        assert tab.reg[name].value == getattr(reg, name), name
    for name in ("repeats", "reg_repeats", "merge"):
        assert tab.prep[name].value == getattr(prep, name), name
    reg_defaults = inspect.signature(generate_reg_images).parameters
    assert reg_defaults["size"].default == (reg.width, reg.height) and reg_defaults["steps"].default == reg.steps
    assert reg_defaults["sampler"].default == reg.sampler
    prep_defaults = inspect.signature(prepare_training_folders).parameters
    assert (prep_defaults["repeats"].default, prep_defaults["reg_repeats"].default) == (prep.repeats, prep.reg_repeats)


@pytest.mark.parametrize("builder, group, request_model, name, new_default", [
    (build_tryit_tab, "fields", TryItRequest, "steps", 9), (build_tryit_tab, "fields", TryItRequest, "cfg_scale", 3.5),
    (build_dataset_tab, "reg", RegImagesRequest, "total", 17), (build_dataset_tab, "prep", PrepareRequest, "repeats", 3),
])
def test_a_default_changed_in_the_declaration_changes_the_widget(monkeypatch, builder, group, request_model, name,
                                                                  new_default):
    monkeypatch.setattr(request_model.model_fields[name], "default", new_default)
    assert getattr(build(builder), group)[name].value == new_default
