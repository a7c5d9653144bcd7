"""The Configuration panel: preset dropdown, load a kohya_ss config by path, save by name or path."""
from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr

from .binding import SettingsForm
from .presets import LoadOutcome, PresetFolders, load_over_form, load_preset, save_preset


@dataclass
class PresetsPanel:
    preset: gr.Dropdown
    refresh: gr.Button
    load_preset: gr.Button
    config_path: gr.Textbox
    load_config: gr.Button
    save_name: gr.Textbox
    save: gr.Button
    status: gr.HTML
    pending_replace: gr.State  # the existing file a second press of Save replaces


def build_presets_panel(folders: PresetFolders) -> PresetsPanel:
    with gr.Row(equal_height=True, elem_classes=["nk-config-row"]):
        preset = gr.Dropdown(choices=list(folders.listing()), value=None, label="Presets", elem_id="preset_choice", scale=4,
                             info="Picking a preset loads it over the form (settings it lacks keep their values).")
        refresh = gr.Button("↻", elem_id="preset_refresh", scale=0, min_width=44, elem_classes=["nk-icon-button"])
        load_preset = gr.Button("Load again", elem_id="preset_load", scale=1, min_width=130)
    with gr.Row(equal_height=True, elem_classes=["nk-config-row"]):
        config_path = gr.Textbox(
            label="Config file", elem_id="config_path", scale=4, max_lines=1,
            placeholder="path to a kohya_ss config .json (loaded as is)",
        )
        load_config = gr.Button("Load config", elem_id="config_load", scale=1, min_width=130)
    with gr.Row(equal_height=True, elem_classes=["nk-config-row"]):
        save_name = gr.Textbox(
            label="Save as", elem_id="preset_save_name", scale=4, max_lines=1,
            placeholder=f"a preset name (saved in {folders.user}) or a full path ending in .json",
        )
        save = gr.Button("Save", elem_id="preset_save", scale=1, min_width=130)
    status = gr.HTML(elem_id="preset_status")
    return PresetsPanel(preset, refresh, load_preset, config_path, load_config, save_name, save, status, gr.State(None))


def wire_presets(panel: PresetsPanel, form: SettingsForm, folders: PresetFolders) -> None:
    def refresh_choices(current=None):
        labels = list(folders.listing())
        return gr.update(choices=labels, value=current if current in labels else None)

    def apply(outcome: LoadOutcome):
        if not outcome.ok:
            return {panel.status: status_html([], outcome.problems)}
        return {**form.updates(outcome.values), form.kept: outcome.kept, panel.status: status_html(outcome.messages, [], outcome.warnings)}

    def pick_preset(data, again=False):
        return apply(load_preset(folders, data[panel.preset], form.values(data), form.kept_values(data), again=again))

    def load_config(data):
        path = (data[panel.config_path] or "").strip()
        if not path:
            return {panel.status: status_html([], ["Type the path of a kohya_ss config file (.json) first."])}
        return apply(load_over_form(path, form.values(data), form.kept_values(data)))

    def save(data):
        outcome = save_preset(folders, data[panel.save_name] or "", form.values(data), form.kept_values(data),
                              confirmed=data[panel.pending_replace])
        choices = refresh_choices(data[panel.preset]) if outcome.ok else gr.update()
        status = status_html(outcome.messages, outcome.problems, outcome.warnings)
        return {panel.status: status, panel.preset: choices, panel.pending_replace: outcome.pending}

    panel.refresh.click(refresh_choices, inputs=panel.preset, outputs=panel.preset, show_progress="hidden")
    outputs = form.outputs(panel.status)
    panel.load_preset.click(lambda data: pick_preset(data, again=True), inputs=form.inputs(panel.preset), outputs=outputs)
    panel.preset.input(pick_preset, inputs=form.inputs(panel.preset), outputs=outputs)  # kohya_ss applies a preset on pick
    panel.load_config.click(load_config, inputs=form.inputs(panel.config_path), outputs=outputs)
    panel.config_path.submit(load_config, inputs=form.inputs(panel.config_path), outputs=outputs)
    save_inputs = form.inputs(panel.save_name, panel.preset, panel.pending_replace)
    save_outputs = [panel.status, panel.preset, panel.pending_replace]
    panel.save.click(save, inputs=save_inputs, outputs=save_outputs)
    panel.save_name.submit(save, inputs=save_inputs, outputs=save_outputs)


def status_html(messages: list[str], problems: list[str], warnings: list[str] = ()) -> str:
    items = [("nk-ok", m) for m in messages] + [("nk-warning", w) for w in warnings] + [("nk-error", p) for p in problems]
    lines = "".join(f'<li class="{cls}">{html.escape(text)}</li>' for cls, text in items)
    return f'<ul class="nk-status">{lines}</ul>' if lines else ""
