"""Settings -> Gradio components, built from each setting's declaration (never by hand).

``build_settings_tabs`` makes one tab per settings tab (kohya_ss's order), one
accordion per section, and returns the components by setting name. Labels,
help, choices, ranges and defaults all come from ``trainer.settings``.
"""
from __future__ import annotations

import html
from itertools import groupby
from typing import Any, Callable, Mapping

import gradio as gr

from trainer.settings import TABS, SettingInfo, TrainingSettings, setting_infos
from trainer.settings.field import request_infos

from .form import form_values
from .path_picker import PathPicker, build_picker, wire_pickers

ROW_KINDS = ("fields", "checks", "full")
# Widgets laid out on a row of their own, full width.
FULL_WIDTH = {"textarea"}
# Path widgets: wider, and each with a picker that browses the server's folders.
PATH_KINDS = {"path", "file", "folder"}
PATH_PLACEHOLDERS = {
    "path": "model file (.safetensors / .ckpt) or diffusers folder",
    "file": "path to a file",
    "folder": "path to a folder",
}
# Shown instead of an empty choice, which a dropdown would draw as a blank line.
EMPTY_CHOICE_LABEL = "(none)"


def elem_id(key: str) -> str:
    """The DOM id of a setting's widget (tests and CSS use it)."""
    return f"setting_{key}"


def build_settings_tabs(
    settings: TrainingSettings | None = None, after_tab: Mapping[str, Callable[[], None]] | None = None,
    sections: dict | None = None,
) -> dict[str, gr.components.Component]:
    """Render the Source Model ... Metadata tabs inside the current Blocks; components by setting name.

    ``after_tab``: tab name -> a function rendering extra (non-setting) content at the end of that tab.
    ``sections``: filled with each section's accordion -> the keys of its settings (to hide an empty one).
    """
    values = form_values(settings or TrainingSettings())
    components: dict[str, gr.components.Component] = {}
    pickers: list[PathPicker] = []
    infos = setting_infos()
    for tab in TABS:
        with gr.Tab(tab, id=tab_id(tab), elem_id=f"tab_{tab_id(tab)}"):
            in_tab = [i for i in infos if i.tab == tab]
            for section, section_infos in groupby(in_tab, key=lambda i: i.section):
                section_infos = list(section_infos)
                accordion = _build_section(section, section_infos, values, components, pickers)
                if accordion is not None and sections is not None:
                    sections[accordion] = [i.key for i in section_infos]
            unused = [i for i in in_tab if i.unused]
            if unused:
                gr.HTML(unused_note_html(unused), elem_id=f"unused_{tab_id(tab)}", elem_classes=["nk-unused-note"])
            if after_tab and tab in after_tab:
                after_tab[tab]()
    wire_pickers(pickers)
    return {info.key: components[info.key] for info in infos}  # declared order


def tab_id(tab: str) -> str:
    return tab.lower().replace(" ", "_")


def unused_note_html(infos: list[SettingInfo]) -> str:
    """The tab's note naming the kohya_ss settings whose widgets are hidden because Nekoya does not use them."""
    items = "".join(f"<li><b>{html.escape(i.label)}</b> (<code>{i.key}</code>): {html.escape(i.unused)}</li>" for i in infos)
    return f'<div class="nk-note">Kept in the JSON config but not used by Nekoya, so not shown:<ul>{items}</ul></div>'


def _build_section(section: str, infos: list[SettingInfo], values: dict[str, Any], out: dict,
                   pickers: list) -> gr.Accordion | None:
    if not section:
        _build_rows(infos, values, out, pickers)
        return None
    with gr.Accordion(section, open=True, elem_classes=["settings-section"]) as accordion:
        _build_rows(infos, values, out, pickers)
    return accordion


def _build_rows(infos: list[SettingInfo], values: dict[str, Any], out: dict, pickers: list) -> None:
    # One wrapping row of fields, then one of checkboxes, then full-width text areas: a dense
    # form like kohya_ss's, without a box per lone checkbox. Declared order holds within each kind.
    for kind in ROW_KINDS:
        run = [i for i in infos if _row_kind(i) == kind]
        if not run:
            continue
        if kind == "full":
            for info in run:
                out[info.key] = build_component(info, values[info.key])
            continue
        with gr.Row(equal_height=False, elem_classes=[f"settings-row-{kind}"]):
            for info in run:
                if info.widget in PATH_KINDS:  # the field with its 📂/📄 picker
                    picker = build_picker(info.widget, lambda: build_component(info, values[info.key]), elem_id(info.key))
                    pickers.append(picker)
                    out[info.key] = picker.field
                else:
                    out[info.key] = build_component(info, values[info.key])


def _row_kind(info: SettingInfo) -> str:
    if info.widget in FULL_WIDTH:
        return "full"
    return "checks" if info.widget == "checkbox" else "fields"


def build_component(info: SettingInfo, value: Any, dom_id: str = "") -> gr.components.Component:
    """One widget for one setting (or tool option), by its declared widget kind. ``dom_id``: when not ``elem_id``'s."""
    label = f"{info.label} ({info.unit})" if info.unit else info.label
    common = dict(label=label, info=info.help or None, elem_id=dom_id or elem_id(info.key))
    if info.unused:  # kept so its value round-trips through the form and config files
        common["visible"] = False
    return _BUILDERS[info.widget](info, value, common)


def build_options(request, tool: str, *names: str) -> dict[str, gr.components.Component]:
    """Widgets for a tool's options (``trainer.tools.requests``), each from its declaration; DOM ids ``<tool>_<name>``."""
    infos = request_infos(request)
    return {name: build_component(infos[name], "" if infos[name].required else infos[name].default, f"{tool}_{name}")
            for name in names}


def _checkbox(info: SettingInfo, value: Any, common: dict) -> gr.components.Component:
    return gr.Checkbox(value=bool(value), min_width=200, **common)


def _dropdown(info: SettingInfo, value: Any, common: dict) -> gr.components.Component:
    # Wide enough for the longest choice (model names are long), within reason.
    longest = max((len(str(c)) for c in info.choices or ()), default=0)
    return gr.Dropdown(
        choices=_choices(info), value=value, allow_custom_value=info.allow_custom, filterable=True,
        min_width=min(440, max(200, 7 * longest)), **common,
    )


def _radio(info: SettingInfo, value: Any, common: dict) -> gr.components.Component:
    return gr.Radio(choices=_choices(info), value=value, min_width=200, **common)


def _number(info: SettingInfo, value: Any, common: dict) -> gr.components.Component:
    # No minimum/maximum here: the settings model reports out-of-range values with the field's name.
    precision = 0 if info.type is int else None
    return gr.Number(value=value, precision=precision, step=info.step or (1 if info.type is int else None), min_width=160, **common)


def _slider(info: SettingInfo, value: Any, common: dict) -> gr.components.Component:
    if info.ge is None or info.le is None:
        return _number(info, value, common)
    precision = 0 if info.type is int else None
    step = info.step or (1 if info.type is int else 0.01)
    return gr.Slider(minimum=info.ge, maximum=info.le, step=step, value=value, precision=precision, min_width=220, **common)


def _text(info: SettingInfo, value: Any, common: dict) -> gr.components.Component:
    return gr.Textbox(value=value, lines=1, max_lines=1, min_width=200, **common)


def _textarea(info: SettingInfo, value: Any, common: dict) -> gr.components.Component:
    return gr.Textbox(value=value, lines=4, max_lines=20, **common)


def _path(info: SettingInfo, value: Any, common: dict) -> gr.components.Component:
    # Typed, or chosen with the picker next to it (it browses the server: the browser may be on another machine).
    return gr.Textbox(value=value, lines=1, max_lines=1, placeholder=PATH_PLACEHOLDERS[info.widget], min_width=260,
                      scale=1, **common)


def _choices(info: SettingInfo) -> list[tuple[str, Any]]:
    return [(EMPTY_CHOICE_LABEL if c == "" else str(c), c) for c in info.choices or ()]


_BUILDERS: dict[str, Callable[[SettingInfo, Any, dict], gr.components.Component]] = {
    "checkbox": _checkbox,
    "dropdown": _dropdown,
    "radio": _radio,
    "number": _number,
    "slider": _slider,
    "text": _text,
    "textarea": _textarea,
    "path": _path,
    "file": _path,
    "folder": _path,
}
