"""The Tools tab (kohya's LoRA › Tools): Inspect / Verify, Resize, Extract, Merge into checkpoint, Merge LoRA,
Merge LoRA (SVD).

Layout and wiring only; ``tools_actions`` calls ``trainer.tools``. The tools run one at
a time in Gradio's queue (each can hold a whole model in memory). Every output path
is refused when it exists unless its "Overwrite" box is ticked.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import gradio as gr

from trainer.tools.requests import (DYNAMIC_DEFAULTS, ExtractRequest, InspectRequest, MergeLorasRequest, MergeRequest,
                                    ResizeRequest, SvdMergeRequest, WritesFile, request_infos)

from . import tools_actions as actions
from .tab_common import LORA_LIST_INFO, REFRESH_LABEL, NamedFields, follow, lora_files, saved_lora_paths, status_box
from .widgets import build_component, build_options

TAB_NAME = "Tools"
LORA_PLACEHOLDER = "LoRA file (.safetensors)"
QUEUE = dict(concurrency_limit=1, concurrency_id="lora_tools")


@dataclass
class ToolsTab:
    tab: gr.Tab
    inspect: NamedFields
    resize: NamedFields
    extract: NamedFields
    merge: NamedFields
    merge_loras: NamedFields
    svd_merge: NamedFields
    buttons: dict[str, gr.Button]
    outputs: dict[str, list]  # tool -> its output components (status first)
    prefilled: gr.State


def _path(label: str, elem_id: str, placeholder: str, **extra) -> gr.Textbox:
    return gr.Textbox(label=label, elem_id=elem_id, max_lines=1, placeholder=placeholder, min_width=320, **extra)


def _out(request, tool: str) -> dict[str, gr.components.Component]:
    with gr.Row(equal_height=True, elem_classes=["nk-tool-row"]):
        return {**build_options(request, tool, "out"), **build_options(WritesFile, tool, "overwrite")}


def _with_none_choice(request, tool: str, name: str, none_label: str) -> dict[str, gr.components.Component]:
    """The option's dropdown, its declared choices led by ``none_label`` for its default of None (a dropdown
    cannot show None)."""
    info = request_infos(request)[name]
    return {name: build_component(replace(info, choices=(none_label, *info.choices)), none_label, f"{tool}_{name}")}


def _lora_slots(request, tool: str) -> dict[str, gr.components.Component]:
    """Four LoRA files, each with its ratio (kohya_ss's A-D); empty slots are left out."""
    slots, ratio = {}, request_infos(request)["ratio"]
    for i in range(1, actions.MERGE_SLOTS + 1):
        with gr.Row(equal_height=True, elem_classes=["nk-tool-row"]):
            slots[f"lora_{i}"] = _path(f"LoRA {i}", f"{tool}_lora_{i}", LORA_PLACEHOLDER, scale=4)
            slots[f"ratio_{i}"] = build_component(ratio, ratio.default, f"{tool}_ratio_{i}")
    return slots


def _slot_values(values: dict) -> list[tuple[str, float]]:
    return [(values[f"lora_{i}"], values[f"ratio_{i}"]) for i in range(1, actions.MERGE_SLOTS + 1)]


def _results(tool: str) -> tuple[gr.HTML, gr.HTML]:
    return status_box(f"{tool}_status"), status_box(f"{tool}_report")


def build_tools_tab() -> ToolsTab:
    buttons, outputs = {}, {}
    with gr.Tab(TAB_NAME, id="tools", elem_id="tab_tools") as tab:
        with gr.Tab("Inspect / Verify", id="tools_inspect"):
            with gr.Row(equal_height=False, elem_classes=["nk-tool-row"]):
                file = gr.Dropdown(label=request_infos(InspectRequest)["file"].label, elem_id="inspect_file", allow_custom_value=True, choices=[],
                                   value=None, scale=1, min_width=320, info=LORA_LIST_INFO)
                buttons["refresh_loras"] = gr.Button(REFRESH_LABEL, elem_id="inspect_refresh_loras", size="sm", scale=0,
                                                     min_width=44)
                base = build_options(InspectRequest, "inspect", "base")
            buttons["inspect"] = gr.Button("Inspect", variant="primary", elem_id="inspect_run")
            status, report = _results("inspect")
            settings = gr.Dataframe(actions.table(actions.SETTING_HEADERS, []), elem_id="inspect_settings",
                                    interactive=False, wrap=True, max_height=320, label="Training settings",
                                    visible=False)
            modules = gr.Dataframe(actions.table(actions.MODULE_HEADERS, []), elem_id="inspect_modules",
                                   interactive=False, max_height=360, label="Modules", visible=False)
            outputs["inspect"] = [status, report, settings, modules]
            inspect = NamedFields({"file": file, **base})
        with gr.Tab("Resize", id="tools_resize"):
            file = build_options(ResizeRequest, "resize", "file")
            with gr.Row(equal_height=False, elem_classes=["nk-tool-row"]):
                method = _with_none_choice(ResizeRequest, "resize", "method", actions.FIXED_RANK)
                options = build_options(ResizeRequest, "resize", "rank", "conv_rank", "param")
                options["param"].visible = False  # shown for a dynamic method
                precision = _with_none_choice(ResizeRequest, "resize", "precision", actions.KEEP_PRECISION)
            out = _out(ResizeRequest, "resize")
            buttons["resize"] = gr.Button("Resize", variant="primary", elem_id="resize_run")
            outputs["resize"] = list(_results("resize"))
            resize = NamedFields({**file, **method, **options, **precision, **out})
        with gr.Tab("Extract", id="tools_extract"):
            with gr.Row(equal_height=False, elem_classes=["nk-tool-row"]):
                models = build_options(ExtractRequest, "extract", "tuned", "base")
            with gr.Row(equal_height=False, elem_classes=["nk-tool-row"]):
                options = build_options(ExtractRequest, "extract", "rank", "conv_rank", "clamp", "min_diff", "precision")
            out = _out(ExtractRequest, "extract")
            buttons["extract"] = gr.Button("Extract", variant="primary", elem_id="extract_run")
            outputs["extract"] = list(_results("extract"))
            extract = NamedFields({**models, **options, **out})
        with gr.Tab("Merge into checkpoint", id="tools_merge"):
            base = build_options(MergeRequest, "merge", "base")
            slots = _lora_slots(MergeRequest, "merge")
            with gr.Row(equal_height=True, elem_classes=["nk-tool-row"]):
                file_format = gr.Radio(list(actions.CHECKPOINT_FORMATS), value=".safetensors", label="Format",
                                       elem_id="merge_format", min_width=220)
                options = build_options(MergeRequest, "merge", "half", "allow_unmatched")
            out = _out(MergeRequest, "merge")
            buttons["merge"] = gr.Button("Merge", variant="primary", elem_id="merge_run")
            outputs["merge"] = list(_results("merge"))
            merge = NamedFields({**base, **slots, "format": file_format, **options, **out})
        with gr.Tab("Merge LoRA", id="tools_merge_loras"):
            gr.Markdown(actions.MERGE_LORAS_NOTE)
            slots = _lora_slots(MergeLorasRequest, "merge_loras")
            with gr.Row(equal_height=True, elem_classes=["nk-tool-row"]):
                options = build_options(MergeLorasRequest, "merge_loras", "concat", "precision")
                precision = _with_none_choice(MergeLorasRequest, "merge_loras", "save_precision",
                                              actions.AS_MERGE_PRECISION)
            out = _out(MergeLorasRequest, "merge_loras")
            buttons["merge_loras"] = gr.Button("Merge LoRAs", variant="primary", elem_id="merge_loras_run")
            outputs["merge_loras"] = list(_results("merge_loras"))
            merge_loras = NamedFields({**slots, **options, **precision, **out})
        with gr.Tab("Merge LoRA (SVD)", id="tools_svd_merge"):
            gr.Markdown(actions.SVD_MERGE_NOTE)
            slots = _lora_slots(SvdMergeRequest, "svd_merge")
            with gr.Row(equal_height=False, elem_classes=["nk-tool-row"]):
                options = build_options(SvdMergeRequest, "svd_merge", "rank", "conv_rank", "clamp", "save_precision")
            out = _out(SvdMergeRequest, "svd_merge")
            buttons["svd_merge"] = gr.Button("Merge by SVD", variant="primary", elem_id="svd_merge_run")
            outputs["svd_merge"] = list(_results("svd_merge"))
            svd_merge = NamedFields({**slots, **options, **out})
        prefilled = gr.State({})  # inside the tab: a State between tabs splits the tab bar
    return ToolsTab(tab, inspect, resize, extract, merge, merge_loras, svd_merge, buttons, outputs, prefilled)


# ---- wiring -----------------------------------------------------------------------------------------


def wire_tools(tab: ToolsTab, form_components: dict, runs) -> None:
    source, output_dir = form_components["pretrained_model_name_or_path"], form_components["output_dir"]
    base_fields = {"inspect": tab.inspect["base"], "extract": tab.extract["base"], "merge": tab.merge["base"]}
    lora_fields = {"inspect_lora": tab.inspect["file"], "resize_lora": tab.resize["file"],
                   "merge_lora": tab.merge["lora_1"], "merge_loras_lora": tab.merge_loras["lora_1"],
                   "svd_merge_lora": tab.svd_merge["lora_1"]}

    def refresh(data):
        """Base models follow the Source Model tab, LoRA files the newest one the run saved (until edited)."""
        prefilled, model = dict(data[tab.prefilled]), (data[source] or "").strip()
        choices = lora_files(saved_lora_paths(runs.snapshot()), data[output_dir])
        newest = choices[0] if choices else ""
        updates = {}
        for fields, value in ((base_fields, model), (lora_fields, newest)):
            for name, box in fields.items():
                updates[box] = prefilled[name] = follow(data[box], prefilled.get(name), value)
        updates[tab.inspect["file"]] = gr.update(choices=choices, value=prefilled["inspect_lora"] or None)
        return {**updates, tab.prefilled: prefilled}

    followers = [*base_fields.values(), *lora_fields.values()]
    refresh_io = dict(inputs={tab.prefilled, source, output_dir, *followers}, outputs=[*followers, tab.prefilled],
                      show_progress="hidden")
    tab.tab.select(refresh, **refresh_io)
    tab.buttons["refresh_loras"].click(refresh, **refresh_io)
    output_dir.change(refresh, trigger_mode="always_last", **refresh_io)
    _wire_inspect(tab)
    _wire_writers(tab)


def _wire_inspect(tab: ToolsTab) -> None:
    def inspect(data):
        values = tab.inspect.values(data)
        status, report, settings, modules = actions.inspect(values["file"], values["base"])
        tables = [gr.update(value=t, visible=actions.has_rows(t)) for t in (settings, modules)]
        return dict(zip(tab.outputs["inspect"], [status, report, *tables]))

    # not behind a merge in the tools' queue: inspecting reads one file and a weightless model
    tab.buttons["inspect"].click(inspect, inputs=tab.inspect.inputs(), outputs=tab.outputs["inspect"])


def _wire_writers(tab: ToolsTab) -> None:
    def resize(data):
        v = tab.resize.values(data)
        return actions.resize(v["file"], v["out"], v["rank"], v["conv_rank"], v["method"], v["param"], v["precision"],
                              v["overwrite"])

    def extract(data, progress=gr.Progress()):
        v = tab.extract.values(data)
        return actions.extract(v["tuned"], v["base"], v["out"], v["rank"], v["conv_rank"], v["clamp"],
                               v["min_diff"], v["precision"], v["overwrite"], log=_progress_text(progress))

    def merge(data, progress=gr.Progress()):
        v = tab.merge.values(data)
        return actions.merge(v["base"], _slot_values(v), v["out"], v["format"], v["half"], v["allow_unmatched"],
                             v["overwrite"], log=_progress_text(progress))

    def merge_loras(data, progress=gr.Progress()):
        v = tab.merge_loras.values(data)
        return actions.merge_loras(_slot_values(v), v["out"], v["concat"], v["precision"], v["save_precision"],
                                   v["overwrite"], log=_progress_text(progress))

    def svd_merge(data, progress=gr.Progress()):
        v = tab.svd_merge.values(data)
        return actions.svd_merge(_slot_values(v), v["out"], v["rank"], v["conv_rank"], v["clamp"],
                                 v["save_precision"], v["overwrite"], log=_progress_text(progress))

    def method_default(method, param):
        """The parameter box shows only for a dynamic method, with that method's usual value."""
        return gr.update(value=DYNAMIC_DEFAULTS.get(method, param), visible=method in DYNAMIC_DEFAULTS)

    tab.resize["method"].input(method_default, inputs=[tab.resize["method"], tab.resize["param"]],
                               outputs=tab.resize["param"], show_progress="hidden")
    for name, fields, handler in (("resize", tab.resize, resize), ("extract", tab.extract, extract),
                                  ("merge", tab.merge, merge), ("merge_loras", tab.merge_loras, merge_loras),
                                  ("svd_merge", tab.svd_merge, svd_merge)):
        tab.buttons[name].click(handler, inputs=fields.inputs(), outputs=tab.outputs[name], **QUEUE)


def _progress_text(progress):
    return lambda message: progress(None, desc=message)
