"""The job queue panel: "Add to queue" (next to Start) and the list of jobs with their buttons.

The queue itself (checks, order, states, the file on disk) is ``trainer.job_queue``; the ``RunManager`` runs
its jobs. This module only shows the jobs and forwards clicks; the decisions are plain functions, tested
without a browser.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Mapping

import gradio as gr

from trainer.job_queue import JobQueue, QueueError
from trainer.settings import SettingsError

from .binding import SettingsForm
from .form import form_values, settings_from_form
from .live_panel import format_duration
from .run_manager import RunManager

POLL_SECONDS = 2.0
STATE_CSS = {"waiting": "nk-muted", "running": "nk-run-info", "done": "nk-run-ok", "failed": "nk-run-refused",
             "stopped": "nk-run-info"}


@dataclass
class QueuePanel:
    table: gr.HTML
    pick: gr.Dropdown  # the job the buttons act on (value: its id)
    up: gr.Button
    down: gr.Button
    duplicate: gr.Button
    remove: gr.Button
    edit: gr.Button  # edit the job back into the form
    run: gr.Button  # start the next waiting job (after a Stop halted the queue)
    message: gr.HTML
    shown: gr.State  # what the table shows, so a poll redraws only a change


def build_queue_panel(queue: JobQueue) -> QueuePanel:
    jobs = _jobs(queue)
    with gr.Accordion("Job queue", open=True, elem_id="nk-queue"):
        table = gr.HTML(render_queue(jobs), elem_id="queue_table")
        pick = gr.Dropdown(job_choices(jobs), value=None, label="Job", elem_id="queue_pick", interactive=True)
        with gr.Row(equal_height=True, elem_classes=["nk-small-buttons"]):
            up = gr.Button("Up", size="sm", elem_id="queue_up")
            down = gr.Button("Down", size="sm", elem_id="queue_down")
            duplicate = gr.Button("Duplicate", size="sm", elem_id="queue_duplicate")
            remove = gr.Button("Remove", size="sm", elem_id="queue_remove")
            edit = gr.Button("Edit in form", size="sm", elem_id="queue_edit")
            run = gr.Button("Run queue", size="sm", elem_id="queue_run")
        message = gr.HTML(elem_id="queue_message")
    return QueuePanel(table, pick, up, down, duplicate, remove, edit, run, message, gr.State(None))


# ---- decisions, as plain Python -----------------------------------------------------------------


def render_queue(jobs: list) -> str:
    if not jobs:
        return '<div class="nk-muted">No jobs. "Add to queue" adds the form as it is now.</div>'
    rows = "".join(_row(number, job) for number, job in enumerate(jobs, 1))
    head = "<tr><th>#</th><th>Name</th><th>Output</th><th>State</th><th>Steps</th><th>Time</th></tr>"
    return f'<table class="nk-queue-table">{head}{rows}</table>'


def _row(number: int, job) -> str:
    steps = f"{job.step} / {job.total_steps}" if job.total_steps else "–"
    state = html.escape(job.state) + (f": {html.escape(job.reason)}" if job.reason else "")
    return (f'<tr data-job="{html.escape(job.id)}" data-state="{html.escape(job.state)}"><td>{number}</td>'
            f"<td>{html.escape(job.name)}</td><td>{html.escape(job.output)}</td>"
            f'<td class="{STATE_CSS.get(job.state, "")}">{state}</td><td>{steps}</td>'
            f"<td>{format_duration(job.elapsed_s)}</td></tr>")


def job_choices(jobs: list) -> list[tuple[str, str]]:
    return [(f"{number}. {job.name}", job.id) for number, job in enumerate(jobs, 1)]


def add_request(queue: JobQueue, runs: RunManager, values: Mapping[str, Any], kept: Mapping[str, Any]) -> str:
    """"Add to queue": the form as a frozen config; it starts at once when nothing runs."""
    try:
        job = queue.add(settings_from_form(values, kept))
    except SettingsError as err:
        return _message("Not added to the queue: " + "; ".join(p.message for p in err.problems), "nk-run-refused")
    except QueueError as err:
        return _message(str(err), "nk-run-refused")
    started, _ = runs.run_queue()
    return _message(f"Added {job.name} to the queue" + (" and started it." if started else "."), "nk-run-ok")


def job_action(queue: JobQueue, action: str, job_id: str | None) -> tuple[str, str | None]:
    """Up, down, duplicate or remove the picked job: (message HTML, the job to keep picked)."""
    if not job_id:
        return _message("Pick a job first.", "nk-run-refused"), None
    try:
        if action in ("up", "down"):
            queue.move(job_id, -1 if action == "up" else 1)
            return "", job_id
        if action == "duplicate":
            return _message("Duplicated.", "nk-run-ok"), queue.duplicate(job_id).id
        job = queue.remove(job_id)
        return _message(f"Removed {job.name}.", "nk-run-ok"), None
    except QueueError as err:
        return _message(str(err), "nk-run-refused"), job_id


def _message(text: str, css: str) -> str:
    return f'<div class="{css}">{html.escape(text)}</div>'


def _jobs(queue: JobQueue) -> list:
    try:
        return queue.jobs()
    except QueueError:
        return []


# ---- wiring ---------------------------------------------------------------------------------------


def wire_queue_panel(demo: gr.Blocks, form: SettingsForm, runs: RunManager, panel: QueuePanel,
                     add_button: gr.Button) -> None:
    p, queue = panel, runs.queue

    def listing(picked: str | None):
        jobs = _jobs(queue)
        keep = picked if any(j.id == picked for j in jobs) else None
        return render_queue(jobs), gr.update(choices=job_choices(jobs), value=keep)

    def on_add(data):
        text = add_request(queue, runs, form.values(data), form.kept_values(data))
        return (text, *listing(data[p.pick]))

    add_button.click(on_add, inputs=form.inputs(p.pick), outputs=[p.message, p.table, p.pick],
                     concurrency_limit=1, concurrency_id="start")
    for action in ("up", "down", "duplicate", "remove"):
        def on_action(job_id, action=action):
            text, keep = job_action(queue, action, job_id)
            return (text, *listing(keep))

        getattr(p, action).click(on_action, inputs=p.pick, outputs=[p.message, p.table, p.pick],
                                 concurrency_limit=1, concurrency_id="queue")

    def on_edit(job_id):
        try:
            settings = queue.settings_of(job_id or "")
        except (QueueError, SettingsError) as err:
            return {p.message: _message(str(err) if job_id else "Pick a job first.", "nk-run-refused")}
        return {**form.updates(form_values(settings)), form.kept: settings.kept_kohya_values(),
                p.message: _message("The job's settings are in the form.", "nk-run-ok")}

    p.edit.click(on_edit, inputs=p.pick, outputs=form.outputs(p.message))
    p.run.click(lambda: _message(runs.run_queue()[1], "nk-run-info"), outputs=p.message, concurrency_id="start")

    def tick(shown, picked):
        """Redraw the table when it changed; the job list only when its jobs or their order changed (an open
        list is not closed by every step of a run)."""
        jobs = _jobs(queue)
        table, choices = render_queue(jobs), job_choices(jobs)
        last_table, last_choices = shown or ("", [])
        pick = gr.skip()
        if choices != [tuple(c) for c in last_choices]:
            pick = gr.update(choices=choices, value=picked if any(j.id == picked for j in jobs) else None)
        return (gr.skip() if table == last_table else table), pick, (table, choices)

    timer = gr.Timer(POLL_SECONDS)
    timer.tick(tick, inputs=[p.shown, p.pick], outputs=[p.table, p.pick, p.shown], show_progress="hidden")
    demo.load(tick, inputs=[p.shown, p.pick], outputs=[p.table, p.pick, p.shown], show_progress="hidden")
