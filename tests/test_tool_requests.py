"""The LoRA tools' options are declared once (``trainer.tools.requests``): the Tools tab's widgets
and the ``lora`` CLI's argparse options both come from that declaration."""
from __future__ import annotations

import argparse

import gradio as gr
import pytest

from app.tab_tools import build_tools_tab
from trainer.commands import lora_cmd
from trainer.tools.requests import (ExtractRequest, InspectRequest, MergeLorasRequest, MergeRequest, ResizeRequest,
                                    SvdMergeRequest, WritesFile, request_infos)

REQUIRED = {"inspect": ["in.safetensors"], "extract": ["--base", "b", "--tuned", "t", "-o", "x.safetensors"], "resize": ["in.safetensors"],
            "merge": ["--base", "b", "--lora", "l.safetensors", "-o", "x.safetensors"],
            "merge_loras": ["--lora", "a.safetensors", "--lora", "b.safetensors", "-o", "x.safetensors"],
            "svd_merge": ["--lora", "a.safetensors", "-o", "x.safetensors"]}
# the tab's tool name -> its sub-command
SUBCOMMANDS = {"merge_loras": "merge-loras", "svd_merge": "svd-merge"}
# (tool, request model, option, a default nobody declares)
OPTIONS = [("extract", ExtractRequest, "rank", 7), ("extract", ExtractRequest, "conv_rank", 3),
           ("extract", ExtractRequest, "clamp", 0.75), ("extract", ExtractRequest, "min_diff", 0.125),
           ("extract", ExtractRequest, "precision", "bf16"), ("resize", ResizeRequest, "rank", 5),
           ("resize", ResizeRequest, "conv_rank", 2), ("resize", ResizeRequest, "param", 0.5),
           ("merge", MergeRequest, "half", True), ("merge", WritesFile, "overwrite", True),
           ("resize", ResizeRequest, "out", "small.safetensors"), ("merge_loras", MergeLorasRequest, "concat", True),
           ("merge_loras", MergeLorasRequest, "precision", "bf16"), ("svd_merge", SvdMergeRequest, "rank", 16),
           ("svd_merge", SvdMergeRequest, "conv_rank", 8), ("svd_merge", SvdMergeRequest, "clamp", 0.5),
           ("svd_merge", SvdMergeRequest, "save_precision", "fp16")]
# options the GUI or the CLI does not offer: merge's ratio (the CLI writes FILE:RATIO), extract's load precision (CLI)
ONE_SIDE_ONLY = {"ratio", "load_precision"}


def cli_args(tool: str, without: str = "") -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    lora_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = REQUIRED[tool]
    if without:
        args = args[:args.index(without)] + args[args.index(without) + 2:]
    return parser.parse_args(["lora", SUBCOMMANDS.get(tool, tool), *args])


def tools_tab():
    with gr.Blocks():
        return build_tools_tab()


@pytest.mark.parametrize("tool, request_model, name, new_default", OPTIONS)
def test_a_default_changed_in_the_request_model_changes_the_widget_and_the_cli(
        monkeypatch, tool, request_model, name, new_default):
    declared = request_infos(request_model)[name]
    assert getattr(cli_args(tool), name) == declared.default == getattr(tools_tab(), tool)[name].value
    monkeypatch.setattr(request_model.model_fields[name], "default", new_default)
    assert getattr(cli_args(tool), name) == new_default
    assert getattr(tools_tab(), tool)[name].value == new_default


def lora_subcommand(tool: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    lora_cmd.add_parser(parser.add_subparsers(dest="command"))
    lora = parser._subparsers._group_actions[0].choices["lora"]
    return lora._subparsers._group_actions[0].choices[SUBCOMMANDS.get(tool, tool)]


@pytest.mark.parametrize("tool, request_model", [("inspect", InspectRequest), ("resize", ResizeRequest),
                                                 ("extract", ExtractRequest), ("merge", MergeRequest),
                                                 ("merge_loras", MergeLorasRequest), ("svd_merge", SvdMergeRequest)])
def test_labels_help_choices_and_required_paths_come_from_the_declaration(tool, request_model):
    widgets, options = getattr(tools_tab(), tool), {a.dest: a for a in lora_subcommand(tool)._actions}
    for name, info in request_infos(request_model).items():
        if name not in options or name not in widgets.components:
            assert name in ONE_SIDE_ONLY
            continue
        assert widgets[name].label == info.label
        assert name == "file" or widgets[name].info == info.help  # inspect's file list has its own note
        assert options[name].help.startswith(info.help) and options[name].choices == info.choices
        assert options[name].required == info.required
        if info.required:
            assert widgets[name].value in ("", None)  # empty until chosen
    if "precision" in request_infos(request_model):
        assert [value for _, value in widgets["precision"].choices][-3:] == list(options["precision"].choices)


def test_a_path_declared_without_a_default_is_required_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        cli_args("extract", without="--tuned")
    assert "the following arguments are required: --tuned" in capsys.readouterr().err


@pytest.mark.parametrize("tool, request_model", [("merge", MergeRequest), ("merge_loras", MergeLorasRequest),
                                                 ("svd_merge", SvdMergeRequest)])
def test_a_merge_lora_without_a_ratio_gets_the_declared_ratio(monkeypatch, tool, request_model):
    monkeypatch.setattr(request_model.model_fields["ratio"], "default", 0.5)
    assert lora_cmd.lora_with_ratio("a.safetensors", request_model) == ("a.safetensors", 0.5)
    assert getattr(tools_tab(), tool)["ratio_1"].value == 0.5
    assert "(default 0.5" in lora_subcommand(tool)._option_string_actions["--lora"].help
