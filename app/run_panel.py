"""The run column: Start/Stop, Pause/Resume and the run buttons, "Train more" after a run, the live status, samples, step plan and run output.

Order matters on a small screen: while a run goes its status block (progress, stats with memory, loss
chart) comes first, then the samples, the step plan and the run's files and log; between runs the step
plan comes first (style.css orders them). The column scrolls on its own.
The decisions are plain functions (``start_request``, ``refresh``) that the wiring maps onto the
page, so they are tested without a browser.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import gradio as gr

from .binding import SettingsForm
from .checks import check_form
from .live_panel import final_message, render_live, render_run_output, sample_gallery
from .plan_panel import plan_html, render_check, render_problems
from .run_manager import ENDED, STOPPING_MESSAGE, RunManager, RunSnapshot

POLL_SECONDS = 1.0
# (run id, snapshot version, sample count, active) that a page shows; run id -1: nothing shown yet
Shown = tuple[int, int, int, bool]
NOTHING_SHOWN: Shown = (-1, -1, -1, False)
MESSAGE_CSS = {"ok": "nk-run-ok", "info": "nk-run-info", "error": "nk-run-refused"}


@dataclass
class RunColumn:
    start: gr.Button
    stop: gr.Button
    pause: gr.Button
    resume: gr.Button
    pause_free: gr.Button  # pause and move the weights to the CPU until Resume
    save_now: gr.Button
    sample_now: gr.Button
    message: gr.HTML
    save_kept_row: gr.Row  # shown when a full disk ended the run and its LoRA waits in memory
    save_kept_path: gr.Textbox
    save_kept: gr.Button
    train_more_row: gr.Row  # shown once a run has finished or was stopped
    train_more_amount: gr.Number
    train_more_unit: gr.Radio
    train_more: gr.Button
    live: gr.HTML
    gallery: gr.Gallery
    plan: gr.HTML
    output: gr.HTML
    page_run: gr.State  # id of the run this page started: its own second click is ignored quietly
    shown: gr.State
    below_buttons: Any  # what ``build_run_column``'s below_buttons built (e.g. Print training command)
    add_to_queue: gr.Button  # wired by app.queue_panel


def build_run_column(runs: RunManager, form_defaults: Mapping[str, Any],
                     below_buttons: Callable[[], Any] = lambda: None) -> RunColumn:
    snap = runs.snapshot()
    with gr.Column(scale=2, min_width=420, elem_id="nk-run-column"):
        with gr.Row(equal_height=True):
            start = gr.Button("Start training", variant="primary", elem_id="start_training", scale=3, interactive=not snap.active)
            stop = gr.Button("Stop training", variant="stop", elem_id="stop_training", scale=2)
            add_to_queue = gr.Button("Add to queue", elem_id="add_to_queue", scale=2)
        with gr.Row(equal_height=True, elem_classes=["nk-small-buttons"]):  # one row: the live panel stays in view
            pause = gr.Button("Pause", size="sm", elem_id="pause_training", interactive=_can_pause(snap), min_width=60)
            pause_free = gr.Button("Pause + free VRAM", size="sm", elem_id="pause_free_memory", min_width=60,
                                   interactive=_can_pause(snap) or _can_resume(snap))
            resume = gr.Button("Resume", size="sm", elem_id="resume_training", interactive=_can_resume(snap),
                               min_width=60)
            save_now = gr.Button("Save LoRA now", size="sm", elem_id="save_now", min_width=60)
            sample_now = gr.Button("Samples now", size="sm", elem_id="sample_now", min_width=60)
        message = gr.HTML(elem_id="run_message", visible=False)  # shown once there is something to say
        with gr.Row(visible=_kept_waiting(snap), elem_id="nk-save-kept", equal_height=True) as save_kept_row:
            save_kept_path = gr.Textbox(label="Folder or .safetensors file on a disk with free space", scale=4,
                                        elem_id="save_kept_path")
            save_kept = gr.Button("Save to…", elem_id="save_kept", scale=1)
        with gr.Row(visible=_can_train_more(snap), elem_id="nk-train-more", equal_height=True) as train_more_row:
            train_more_amount = gr.Number(1, label="Train more", minimum=1, precision=0, scale=1,
                                          elem_id="train_more_amount")
            train_more_unit = gr.Radio(["epochs", "steps"], value="epochs", label="of", scale=1,
                                       elem_id="train_more_unit")
            train_more = gr.Button("Train more", elem_id="train_more", scale=1)
        live = gr.HTML(render_live(snap), elem_id="nk-live-panel")
        gallery = gr.Gallery(label="Samples", columns=4, height=220, elem_id="samples_gallery", interactive=False, visible=False,
                             object_fit="scale-down")  # a 64 px sample stays 64 px (style.css: also when enlarged)
        gr.HTML('<div class="nk-section-title">Step plan and checks</div>', elem_id="nk-plan-title")
        plan = gr.HTML(plan_html(form_defaults), elem_id="nk-plan")
        output = gr.HTML(render_run_output(snap), elem_id="nk-run-output")
        with gr.Column(elem_id="nk-run-extras"):  # queue, training command, TensorBoard: after what a run shows
            extra = below_buttons()
        page_run, shown = gr.State(0), gr.State(NOTHING_SHOWN)
    return RunColumn(start, stop, pause, resume, pause_free, save_now, sample_now, message, save_kept_row, save_kept_path,
                     save_kept, train_more_row, train_more_amount, train_more_unit, train_more, live, gallery, plan,
                     output, page_run, shown, extra, add_to_queue)


# ---- decisions, as plain Python -----------------------------------------------------------------


@dataclass(frozen=True)
class StartReply:
    message: str | None  # HTML; None: the message stays as it is
    plan: str | None  # the check with its problems when the start is refused; None: unchanged
    page_run: int
    start_enabled: bool | None  # None: unchanged


def start_request(runs: RunManager, values: Mapping[str, Any], kept: Mapping[str, Any], page_run: int) -> StartReply:
    """What a press of Start does. While a run goes, this page's own second press (a double click) changes
    nothing; a press on another page says, neutrally, which run is going."""
    if runs.busy:  # checked first: another page's form may not even be filled in
        own = runs.snapshot().run_id == page_run
        return StartReply(None if own else message_html(runs.start_refusal(), "info"), None, page_run, False)
    result = check_form(values, kept)
    if not result.ok:
        text = '<div class="nk-run-refused"><b>Not started.</b> Fix these first:</div>' + render_problems(result.errors)
        return StartReply(text, render_check(result), page_run, None)
    started, text = runs.start(result.settings)
    if not started:  # another page won the race between the busy check and here
        return StartReply(message_html(text, "info"), None, page_run, False)
    return StartReply(message_html(text, "ok"), None, runs.snapshot().run_id, False)


@dataclass(frozen=True)
class PageRefresh:
    live: str | None  # None: unchanged
    output: str | None
    samples_changed: bool
    start_enabled: bool | None
    message: str | None  # the run's final state, once, when this page saw it end
    save_kept_visible: bool | None  # None: unchanged
    train_more_visible: bool | None  # None: unchanged
    pause_buttons: tuple[bool, bool] | None  # (Pause enabled, Resume enabled); None: unchanged
    shown: Shown


def refresh(snap: RunSnapshot, last: Shown, page_message: str | None = None) -> PageRefresh:
    """One poll of a page that shows ``last`` (and ``page_message`` above the run): what to redraw."""
    run_id, version, samples, was_active = last
    new_run = snap.run_id != run_id
    changed = new_run or snap.version != version
    first = run_id == NOTHING_SHOWN[0]
    # A run this page saw going (or one that began and ended between two polls) has ended.
    ended = not first and not snap.active and snap.run_id > 0 and (was_active or new_run)
    # Stop's reply can reach the page after the poll that announced the end and cover it: announce it again
    covered = bool(page_message) and STOPPING_MESSAGE in page_message and not snap.active and snap.run_id > 0
    ending = final_message(snap) if ended or covered else None
    return PageRefresh(
        live=render_live(snap) if changed or snap.active else None,  # the elapsed time moves every poll
        output=render_run_output(snap) if changed else None,
        samples_changed=new_run or len(snap.samples) != samples,
        # a run may begin and end between two polls: Start, greyed by the click, comes back all the same
        start_enabled=not snap.active if first or new_run or snap.active != was_active else None,
        message=message_html(*ending) if ending else None,
        save_kept_visible=_kept_waiting(snap) if changed else None,
        train_more_visible=_can_train_more(snap) if changed else None,
        pause_buttons=(_can_pause(snap), _can_resume(snap)) if changed else None,
        shown=(snap.run_id, snap.version, len(snap.samples), snap.active),
    )


def _kept_waiting(snap: RunSnapshot) -> bool:
    return snap.disk_full is not None and not snap.kept_saved_to


def _can_pause(snap: RunSnapshot) -> bool:
    return snap.status in ("starting", "running")


def _can_resume(snap: RunSnapshot) -> bool:
    return snap.status in ("pausing", "paused")


def _can_train_more(snap: RunSnapshot) -> bool:
    return snap.status in ENDED and bool(snap.saved)


def train_more_request(runs: RunManager, amount: Any, unit: str) -> tuple[str, bool]:
    """What a press of "Train more" does: (message HTML, whether a run started)."""
    try:
        count = int(amount or 0)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        return message_html(f"Train more: type how many {unit} (1 or more).", "error"), False
    started, text = runs.train_more(count, unit)
    return message_html(text, "ok" if started else "error"), started


def message_html(text: str, kind: str = "ok") -> str:
    return f'<div class="{MESSAGE_CSS[kind]}">{html.escape(text)}</div>'


# ---- wiring ---------------------------------------------------------------------------------------


def wire_run_column(demo: gr.Blocks, form: SettingsForm, runs: RunManager, column: RunColumn) -> None:
    c = column

    def on_start(data):
        reply = start_request(runs, form.values(data), form.kept_values(data), data[c.page_run])
        return {c.message: _shown(reply.message), c.plan: _or_skip(reply.plan), c.page_run: reply.page_run,
                c.start: gr.skip() if reply.start_enabled is None else gr.update(interactive=reply.start_enabled)}

    c.start.click(on_start, inputs=form.inputs(c.page_run), outputs=[c.message, c.plan, c.page_run, c.start],
                  concurrency_limit=1, concurrency_id="start")
    c.stop.click(lambda: _shown(message_html(runs.stop())), outputs=c.message, show_progress="hidden")
    c.save_now.click(lambda: _shown(message_html(runs.request_save())), outputs=c.message, show_progress="hidden")
    c.sample_now.click(lambda: _shown(message_html(runs.request_sample())), outputs=c.message, show_progress="hidden")
    c.pause.click(lambda: _shown(message_html(runs.pause())), outputs=c.message, show_progress="hidden")
    c.pause_free.click(lambda: _shown(message_html(runs.pause(free_memory=True))), outputs=c.message,
                       show_progress="hidden")
    c.resume.click(lambda: _shown(message_html(runs.resume())), outputs=c.message, show_progress="hidden")

    def on_train_more(amount, unit):
        text, started = train_more_request(runs, amount, unit)
        return _shown(text), gr.update(interactive=False) if started else gr.skip()

    c.train_more.click(on_train_more, inputs=[c.train_more_amount, c.train_more_unit], outputs=[c.message, c.start],
                       concurrency_limit=1, concurrency_id="start")

    def on_save_kept(path):
        saved, text = runs.save_kept_to(path or "")
        return _shown(message_html(text, "ok" if saved else "error")), gr.update(visible=not saved)

    c.save_kept.click(on_save_kept, inputs=c.save_kept_path, outputs=[c.message, c.save_kept_row], show_progress="hidden")

    def tick(last, page_message):
        snap = runs.snapshot()
        r = refresh(snap, tuple(last), page_message)
        gallery = gr.update(value=sample_gallery(snap), visible=bool(snap.samples)) if r.samples_changed else gr.skip()
        start = gr.skip() if r.start_enabled is None else gr.update(interactive=r.start_enabled)
        kept = gr.skip() if r.save_kept_visible is None else gr.update(visible=r.save_kept_visible)
        more = gr.skip() if r.train_more_visible is None else gr.update(visible=r.train_more_visible)
        pause, resume = (gr.skip(),) * 2 if r.pause_buttons is None else (
            gr.update(interactive=on) for on in r.pause_buttons)
        pause_free = gr.skip() if r.pause_buttons is None else gr.update(interactive=any(r.pause_buttons))
        return (_or_skip(r.live), _or_skip(r.output), gallery, start, _shown(r.message), kept, more, pause, resume,
                pause_free, r.shown)

    outputs = [c.live, c.output, c.gallery, c.start, c.message, c.save_kept_row, c.train_more_row, c.pause, c.resume,
               c.pause_free, c.shown]
    timer = gr.Timer(POLL_SECONDS)
    timer.tick(tick, inputs=[c.shown, c.message], outputs=outputs, show_progress="hidden", queue=True)
    demo.load(tick, inputs=[c.shown, c.message], outputs=outputs, show_progress="hidden")


def _or_skip(value):
    return gr.skip() if value is None else value


def _shown(message: str | None):
    return gr.skip() if message is None else gr.update(value=message, visible=True)
