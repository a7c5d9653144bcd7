"""The Nekoya page: the kohya_ss tabs on the left, the step plan and the live run on the right.

``build_app`` only assembles panels; each panel's logic lives in its own module.
Run state lives in the ``RunManager`` (server-side), so reloading the page shows
the run that is going.
"""
from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from trainer.settings import TrainingSettings

from .binding import SettingsForm
from .checks import check_form
from .extra_tabs import build_extra_tabs, wire_extra_tabs
from .form import form_values
from .live_panel import render_live, sample_gallery
from .model_pick import on_model_path, on_quick_pick
from .plan_panel import plan_html, render_check, render_problems, wire_plan
from .presets import PRESETS_DIR, PresetFolders, default_user_presets_dir
from .presets_panel import build_presets_panel, wire_presets
from .run_manager import RunManager
from .train_command import build_train_command_panel, wire_train_command
from .visibility import wire_visibility
from .widgets import build_settings_tabs

TITLE = "Nekoya · LoRA training"
POLL_SECONDS = 1.0
CSS_FILE = Path(__file__).with_name("style.css")


def build_app(
    run_manager: RunManager | None = None,
    presets_dir: str | Path = PRESETS_DIR,
    user_presets_dir: str | Path | None = None,
    headless: bool = False,
) -> gr.Blocks:
    runs = run_manager or RunManager()
    folders = PresetFolders(Path(presets_dir), Path(user_presets_dir) if user_presets_dir else default_user_presets_dir())
    defaults = TrainingSettings()
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
                        components = build_settings_tabs(defaults, after_tab={"Source Model": lambda: notes.update(model=gr.HTML(elem_id="model_note"))})
                    with gr.Column(scale=2, min_width=420, elem_id="nk-run-column"):
                        with gr.Row(equal_height=True):
                            start = gr.Button("Start training", variant="primary", elem_id="start_training", scale=3)
                            stop = gr.Button("Stop training", variant="stop", elem_id="stop_training", scale=2)
                        with gr.Row(equal_height=True, elem_classes=["nk-small-buttons"]):
                            save_now = gr.Button("Save the LoRA now", size="sm", elem_id="save_now")
                            sample_now = gr.Button("Make samples now", size="sm", elem_id="sample_now")
                        train_command = build_train_command_panel()
                        run_message = gr.HTML(elem_id="run_message", visible=False)  # shown once there is something to say
                        live = gr.HTML(render_live(runs.snapshot()), elem_id="nk-live-panel")
                        gallery = gr.Gallery(label="Samples", columns=4, height=260, elem_id="samples_gallery", interactive=False, visible=False)
                        gr.HTML('<div class="nk-section-title">Step plan and checks</div>')
                        plan = gr.HTML(plan_html(form_values(defaults)), elem_id="nk-plan")
            extra_tabs = build_extra_tabs()  # Dataset Preparation, Try it, Tools
        form = SettingsForm(components, kept)
        wire_presets(presets, form, folders)
        wire_visibility(form.components, form_values(defaults))
        wire_plan(form, plan)
        _wire_model_pick(form, notes["model"])
        _wire_run(form, runs, start, stop, save_now, sample_now, run_message, plan)
        wire_train_command(train_command, form)
        _wire_live(demo, runs, live, gallery)
        wire_extra_tabs(extra_tabs, form.components, runs, start)
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
    outputs = [*(form.components[k] for k in ("pretrained_model_name_or_path", "model_list", "v2", "v_parameterization", "sdxl")), note]

    def picked(name):
        values, message = on_quick_pick(name)
        return {**form.updates(values), note: _note(message)}

    def typed(value):
        values, message = on_model_path(value)
        return {**form.updates(values), note: _note(message)}

    pick.input(picked, inputs=pick, outputs=outputs, show_progress="hidden")
    # change, not input: a pasted path, a loaded config or a quick pick all re-derive the flags
    # (the quick pick is bound to input only, so the two never trigger each other in a loop).
    path.change(typed, inputs=path, outputs=outputs, show_progress="hidden", trigger_mode="always_last")


def _note(message: str) -> str:
    return f'<div class="nk-note">{html.escape(message)}</div>' if message else ""


def _wire_run(form: SettingsForm, runs: RunManager, start, stop, save_now, sample_now, message: gr.HTML, plan: gr.HTML) -> None:
    def start_run(data):
        if runs.busy:  # checked first: another page's form may not even be filled in
            return {message: _message(runs.start_refusal(), ok=False), plan: gr.update()}
        result = check_form(form.values(data), form.kept_values(data))
        if not result.ok:
            text = '<div class="nk-run-refused"><b>Not started.</b> Fix these first:</div>' + render_problems(result.errors)
            return {message: gr.update(value=text, visible=True), plan: render_check(result)}
        started, text = runs.start(result.settings)
        return {message: _message(text, ok=started), plan: gr.update()}

    start.click(start_run, inputs=form.inputs(), outputs=[message, plan], concurrency_limit=1, concurrency_id="start")
    stop.click(lambda: _message(runs.stop()), outputs=message, show_progress="hidden")
    save_now.click(lambda: _message(runs.request_save()), outputs=message, show_progress="hidden")
    sample_now.click(lambda: _message(runs.request_sample()), outputs=message, show_progress="hidden")


def _message(text: str, ok: bool = True):
    css = "nk-run-ok" if ok else "nk-run-refused"
    return gr.update(value=f'<div class="{css}">{html.escape(text)}</div>', visible=True)


def _running_form(form: SettingsForm, runs: RunManager):
    """A page opened while a run is going shows that run's settings (so it can be saved or compared)."""
    if not runs.busy or runs.settings is None:
        return {form.kept: gr.skip()}  # Gradio refuses an empty dict: name one output, left as is
    settings = runs.settings
    return {**form.updates(form_values(settings)), form.kept: settings.kept_kohya_values()}


def _wire_live(demo: gr.Blocks, runs: RunManager, live: gr.HTML, gallery: gr.Gallery) -> None:
    shown = gr.State((0, -1, -1))  # (run id, snapshot version, sample count) this page shows

    def tick(last):
        snap = runs.snapshot()
        run_id, version, samples = last
        changed = snap.run_id != run_id or snap.version != version
        html_out = render_live(snap) if changed or snap.active else gr.skip()
        new_samples = snap.run_id != run_id or len(snap.samples) != samples
        gallery_out = gr.update(value=sample_gallery(snap), visible=bool(snap.samples)) if new_samples else gr.skip()
        return html_out, gallery_out, (snap.run_id, snap.version, len(snap.samples))

    timer = gr.Timer(POLL_SECONDS)
    timer.tick(tick, inputs=shown, outputs=[live, gallery, shown], show_progress="hidden", queue=True)
    demo.load(tick, inputs=shown, outputs=[live, gallery, shown], show_progress="hidden")
