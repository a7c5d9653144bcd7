"""The live step plan: the formula with its numbers, per-folder counts and the check's problems.

``render_check`` turns a ``CheckResult`` into HTML; ``wire_plan`` recomputes it
whenever a setting changes (only the newest edit is computed, so typing never waits).
"""
from __future__ import annotations

import html
from typing import Any, Mapping

import gradio as gr

from trainer.problems import Problem
from trainer.settings import is_setting, setting_info

from .binding import SettingsForm
from .checks import CheckResult, check_form

SEVERITY_LABEL = {"error": "Error", "warning": "Warning", "note": "Note"}


def plan_html(values: Mapping[str, Any], kept: Mapping[str, Any] | None = None) -> str:
    return render_check(check_form(values, kept))


def render_check(result: CheckResult) -> str:
    parts = ['<div class="nk-plan">', _plan_part(result.plan), render_problems(result.problems)]
    if result.memory:
        first, *rest = result.memory.splitlines()
        more = "".join(f"<div>{html.escape(line)}</div>" for line in rest)
        parts.append(f'<details class="nk-memory"><summary>Memory: {html.escape(first)}</summary>{more}</details>')
    if result.ok:
        parts.append(f'<div class="nk-ready">{html.escape(result.readiness)}</div>')
    parts.append("</div>")
    return "".join(parts)


def _plan_part(plan: Any) -> str:
    if plan is None:
        return '<div class="nk-plan-formula nk-muted">Step plan: fix the settings below first.</div>'
    formula = html.escape(plan.formula)
    head = f'<div class="nk-plan-formula" id="nk-plan-formula">{formula}</div>'
    if not plan.total_steps:
        return head
    stats = (
        f'<div class="nk-plan-stats"><span><b>{plan.total_steps}</b> steps</span>'
        f"<span><b>{plan.epochs}</b> epoch{'s' if plan.epochs != 1 else ''}</span>"
        f"<span><b>{plan.steps_per_epoch}</b> steps / epoch</span>"
        f"<span><b>{plan.train_images}</b> images"
        + (f" + <b>{plan.reg_images}</b> reg" if plan.reg_images else "")
        + f"</span><span>batch <b>{plan.batch_size}</b></span></div>"
    )
    folders = "".join(f"<li>{html.escape(line.describe())}</li>" for line in plan.per_folder)
    return head + stats + (f'<ul class="nk-plan-folders">{folders}</ul>' if folders else "")


def render_problems(problems: list[Problem], shown_per_severity: int = 4) -> str:
    """Problems by severity; beyond the first few of one severity the rest fold away (a folder of
    small images should not push everything else off the screen)."""
    if not problems:
        return ""
    parts = []
    for severity in dict.fromkeys(p.severity for p in problems):
        group = [p for p in problems if p.severity == severity]
        head, rest = group[:shown_per_severity], group[shown_per_severity:]
        parts.append("".join(_problem_item(p) for p in head))
        if rest:
            noun = SEVERITY_LABEL.get(severity, severity).lower() + "s"
            more = "".join(_problem_item(p) for p in rest)
            parts.append(f'<li class="nk-more"><details><summary>{len(rest)} more {noun}</summary><ul class="nk-problems">{more}</ul></details></li>')
    return f'<ul class="nk-problems">{"".join(parts)}</ul>'


def _problem_item(problem: Problem) -> str:
    where = ""
    if problem.field and is_setting(problem.field):
        info = setting_info(problem.field)
        where = f'<span class="nk-field">{html.escape(info.tab)} › {html.escape(info.label)}</span> '
    badge = SEVERITY_LABEL.get(problem.severity, problem.severity.title())
    fix = f'<div class="nk-fix">Fix: {html.escape(problem.fix)}</div>' if problem.fix else ""
    return (
        f'<li class="nk-{html.escape(problem.severity)}"><span class="nk-badge">{badge}</span> '
        f"{where}{html.escape(problem.message)}{fix}</li>"
    )


def wire_plan(form: SettingsForm, output: gr.HTML) -> None:
    """Recompute the plan on every settings change; only the newest pending edit runs."""

    def update(data):
        return plan_html(form.values(data), form.kept_values(data))

    gr.on(
        triggers=[c.change for c in form.components.values()],
        fn=update,
        inputs=form.inputs(),
        outputs=output,
        trigger_mode="always_last",
        show_progress="hidden",
        concurrency_limit=2,
        concurrency_id="plan",
    )
