"""Every choice of the tool forms is declared once, on its request model: the GUI's dropdowns and the
``lora`` CLI's ``choices`` must list exactly what the model declares, and the dynamic methods have
one list that the resize code, the page and the command line all read."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from app import tools_actions
from app.tab_tryit import build_tryit_tab
from app.widgets import PATH_PLACEHOLDERS
from test_form_requests import build
from test_tool_requests import lora_subcommand, tools_tab
from trainer.inference.requests import TryItRequest
from trainer.settings.field import request_infos
from trainer.tools import lowrank, resize
from trainer.tools.requests import (DYNAMIC_DEFAULTS, DYNAMIC_METHODS, SAVE_PRECISIONS, ExtractRequest, InspectRequest,
                                    MergeLorasRequest, MergeRequest, ResizeRequest, SvdMergeRequest)

TOOLS = [("inspect", InspectRequest), ("resize", ResizeRequest), ("extract", ExtractRequest), ("merge", MergeRequest),
         ("merge_loras", MergeLorasRequest), ("svd_merge", SvdMergeRequest)]
# the page's entry for an option whose default is None (a dropdown cannot show None)
NONE_CHOICES = {("resize", "method"): tools_actions.FIXED_RANK, ("resize", "precision"): tools_actions.KEEP_PRECISION,
                ("merge_loras", "save_precision"): tools_actions.AS_MERGE_PRECISION}


def gui_choices(widget) -> tuple:
    return tuple(value for _, value in widget.choices)


def choice_options(request_model) -> dict:
    return {name: info for name, info in request_infos(request_model).items() if info.choices is not None}


@pytest.mark.parametrize("tool, request_model", TOOLS)
def test_the_gui_and_the_cli_offer_exactly_the_declared_choices(tool, request_model):
    widgets, cli = getattr(tools_tab(), tool), {a.dest: a for a in lora_subcommand(tool)._actions}
    for name, info in choice_options(request_model).items():
        assert tuple(cli[name].choices) == info.choices and cli[name].default == info.default, name
        if name not in widgets.components:  # command line only (extract's load precision)
            continue
        none_choice = NONE_CHOICES.get((tool, name))
        assert (none_choice is not None) == (info.default is None), name
        leading = (none_choice,) if none_choice else ()
        assert gui_choices(widgets[name]) == (*leading, *info.choices), name
        assert widgets[name].value == (none_choice or info.default), name


def test_the_resize_and_extract_choices_are_the_declared_lists():
    infos, extract = choice_options(ResizeRequest), choice_options(ExtractRequest)
    assert infos["method"].choices == DYNAMIC_METHODS == tuple(DYNAMIC_DEFAULTS)
    assert infos["precision"].choices == extract["precision"].choices == extract["load_precision"].choices
    assert extract["precision"].choices == SAVE_PRECISIONS
    merges = [*choice_options(MergeLorasRequest).values(), *choice_options(SvdMergeRequest).values()]
    assert [info.choices for info in merges] == [SAVE_PRECISIONS] * 3


def test_a_method_added_to_the_declaration_reaches_the_page_and_the_command_line(monkeypatch):
    declared = ResizeRequest.model_fields["method"].json_schema_extra
    monkeypatch.setitem(declared, "choices", [*DYNAMIC_METHODS, "sv_new"])
    assert gui_choices(tools_tab().resize["method"])[-1] == "sv_new"
    assert lora_subcommand("resize")._option_string_actions["--dynamic"].choices[-1] == "sv_new"


def test_lora_resize_help_lists_the_methods_and_precisions():
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "trainer", "lora", "resize", "--help"], capture_output=True,
                            text=True, env=env, check=True)
    text = " ".join(result.stdout.split())
    assert "--dynamic {" + ",".join(DYNAMIC_METHODS) + "}" in text
    assert "--save-precision {" + ",".join(SAVE_PRECISIONS) + "}" in text
    for name in ("method", "precision"):
        assert " ".join(request_infos(ResizeRequest)[name].help.split()) in text


def test_every_declared_dynamic_method_has_a_rank_rule():
    assert tuple(lowrank.RANK_RULES) == DYNAMIC_METHODS and resize.DYNAMIC_METHODS is DYNAMIC_METHODS
    singular = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    for method, param in DYNAMIC_DEFAULTS.items():
        assert 1 <= lowrank.choose_rank(singular, 5, method, param) <= 5, method


def test_tryit_model_fields_come_from_the_declaration(monkeypatch):
    infos = request_infos(TryItRequest)
    fields = build(build_tryit_tab).fields
    assert fields["base_model"].placeholder == PATH_PLACEHOLDERS[infos["base_model"].widget]
    assert fields["base_model"].info == infos["base_model"].help and fields["lora"].info.endswith(infos["lora"].help)
    assert gui_choices(fields["sampler"]) == infos["sampler"].choices
    for name in ("base_model", "lora"):
        monkeypatch.setitem(TryItRequest.model_fields[name].json_schema_extra, "label", f"declared {name}")
    fields = build(build_tryit_tab).fields
    assert (fields["base_model"].label, fields["lora"].label) == ("declared base_model", "declared lora")
