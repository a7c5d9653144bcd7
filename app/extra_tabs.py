"""The tabs around training, after the settings tabs: Dataset Preparation, Try it, Tools.

``build_extra_tabs`` renders them (inside the settings tabs' column, so they share its
tab bar); ``wire_extra_tabs`` binds them to the settings widgets by kohya key, to the
run manager (files the run saved) and to the Start button (which frees the Try it model).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from .tab_common import ImageModels
from .tab_dataset import DatasetTab, build_dataset_tab, wire_dataset
from .tab_tools import ToolsTab, build_tools_tab, wire_tools
from .tab_tryit import TryItTab, build_tryit_tab, wire_release_on_start, wire_tryit


@dataclass
class ExtraTabs:
    dataset: DatasetTab
    tryit: TryItTab
    tools: ToolsTab
    models: ImageModels = field(default_factory=ImageModels)


def build_extra_tabs(models: ImageModels | None = None) -> ExtraTabs:
    return ExtraTabs(build_dataset_tab(), build_tryit_tab(), build_tools_tab(), models or ImageModels())


def wire_extra_tabs(tabs: ExtraTabs, form_components: dict, runs, start: gr.Button) -> None:
    wire_dataset(tabs.dataset, form_components, tabs.models)
    wire_tryit(tabs.tryit, form_components, runs, tabs.models)
    wire_tools(tabs.tools, form_components, runs)
    wire_release_on_start(start, tabs.models)
