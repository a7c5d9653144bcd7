"""The Nekoya page: the kohya_ss tabs on the left, the step plan and the live run on the right.

``build_app`` only assembles panels; each panel's logic lives in its own module.
Run state lives in the ``RunManager`` (server-side), so reloading the page shows
the run that is going.
"""
from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from trainer.families import FLAG_KEYS
from trainer.job_queue import JobQueue
from trainer.settings import TrainingSettings

from .binding import SettingsForm
from .extra_tabs import build_extra_tabs, wire_extra_tabs
from .form import form_values
from .model_pick import on_model_path, on_quick_pick
from .path_picker import note_html
from .plan_panel import wire_plan
from .presets import PRESETS_DIR, PresetFolders, default_user_presets_dir
from .presets_panel import build_presets_panel, wire_presets
from .queue_panel import build_queue_panel, wire_queue_panel
from .run_manager import RunManager
from .run_panel import build_run_column, wire_run_column
from .train_command import build_train_command_panel, wire_train_command
from .visibility import wire_visibility
from .widgets import build_settings_tabs

TITLE = "Nekoya · LoRA training"
CSS_FILE = Path(__file__).with_name("style.css")


def build_app(
    run_manager: RunManager | None = None,
    presets_dir: str | Path = PRESETS_DIR,
    user_presets_dir: str | Path | None = None,
    headless: bool = False,
    defaults: TrainingSettings | None = None,
    job_queue: JobQueue | None = None,
) -> gr.Blocks:
    """``defaults``: the form's starting values (kohya_ss's config.toml through ``launch.py --config``);
    ``job_queue``: the queue the page shows and runs (default: ``$NEKOYA_QUEUE_DIR`` or ``<repo>/queue``)."""
    runs = run_manager or RunManager()
    if runs.queue is None:  # at app start: jobs a dead app left running, then the waiting ones, go on
        runs.attach_queue(job_queue or JobQueue())
    folders = PresetFolders(Path(presets_dir), Path(user_presets_dir) if user_presets_dir else default_user_presets_dir())
    defaults = defaults or TrainingSettings()
    with gr.Blocks(title=TITLE, analytics_enabled=False, fill_width=True) as demo:
        gr.HTML(_header_html(headless), elem_id="nk-header")
        kept = gr.State({})
        with gr.Tabs(elem_id="nk-pages"):  # Training (kohya's LoRA › Training), then the tabs around it
            with gr.Tab("Training", id="training", elem_id="tab_training"):
                with gr.Row(elem_id="nk-main", equal_height=False):
                    with gr.Column(scale=3, min_width=560, elem_id="nk-form-column"):
                        with gr.Accordion("Configuration: presets and config files", open=True, elem_id="nk-config-accordion"):
                            presets = build_presets_panel(folders)
                        notes: dict[str, gr.components.Component] = {}
                        sections: dict = {}
                        components = build_settings_tabs(defaults, after_tab={"Source Model": lambda: notes.update(model=gr.HTML(elem_id="model_note"))},
                                                         sections=sections)
                    panels: dict = {}

                    def below_start():
                        panels["queue"] = build_queue_panel(runs.queue)
                        return build_train_command_panel()

                    column = build_run_column(runs, form_values(defaults), below_buttons=below_start)
            extra_tabs = build_extra_tabs()  # Dataset Preparation, Try it, Tools
        form = SettingsForm(components, kept)
        wire_presets(presets, form, folders)
        wire_visibility(form.components, form_values(defaults), sections)
        wire_plan(form, column.plan)
        _wire_model_pick(form, notes["model"])
        wire_run_column(demo, form, runs, column)
        wire_queue_panel(demo, form, runs, panels["queue"], column.add_to_queue)
        wire_train_command(column.below_buttons, form)
        wire_extra_tabs(extra_tabs, form.components, runs, column.start)
        demo.load(lambda: _running_form(form, runs), outputs=form.outputs(), show_progress="hidden")
        demo.load(lambda: gr.update(choices=list(folders.listing())), outputs=presets.preset, show_progress="hidden")
    return demo


def launch_options() -> dict:
    """Theme and CSS (Gradio 6 takes them in ``launch``), shared by the server and the tests."""
    # System fonts only: the GUI must not fetch web fonts (it often runs offline).
    theme = gr.themes.Default(
        primary_hue="indigo", secondary_hue="slate", neutral_hue="slate", spacing_size="sm", text_size="sm", radius_size="sm",
        font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    )
    return {"theme": theme, "css": CSS_FILE.read_text(encoding="utf-8"), "ssr_mode": False}


def _header_html(headless: bool) -> str:
    mode = ' <span class="nk-muted">· headless</span>' if headless else ""
    return (
        '<div class="nk-header"><span class="nk-logo">Nekoya</span>'
        f'<span class="nk-tagline">LoRA training · kohya_ss settings, live run{mode}</span></div>'
    )


def _wire_model_pick(form: SettingsForm, note: gr.HTML) -> None:
    pick, path = form.components["model_list"], form.components["pretrained_model_name_or_path"]
    outputs = [*(form.components[k] for k in ("pretrained_model_name_or_path", "model_list", *FLAG_KEYS)), note]

    def picked(name):
        values, message = on_quick_pick(name)
        return {**form.updates(values), note: note_html(message)}

    def typed(value):
        values, message = on_model_path(value)
        return {**form.updates(values), note: note_html(message)}

    pick.input(picked, inputs=pick, outputs=outputs, show_progress="hidden")
    # change, not input: a pasted path, a loaded config or a quick pick all re-derive the flags
    # (the quick pick is bound to input only, so the two never trigger each other in a loop).
    path.change(typed, inputs=path, outputs=outputs, show_progress="hidden", trigger_mode="always_last")


def _running_form(form: SettingsForm, runs: RunManager):
    """A page opened while a run is going shows that run's settings (so it can be saved or compared)."""
    if not runs.busy or runs.settings is None:
        return {form.kept: gr.skip()}  # Gradio refuses an empty dict: name one output, left as is
    settings = runs.settings
    return {**form.updates(form_values(settings)), form.kept: settings.kept_kohya_values()}
