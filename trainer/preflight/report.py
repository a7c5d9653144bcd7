"""What a preflight check found: problems with the field or file they concern, and how to fix them.

Each finding is a ``trainer.problems.Problem`` (the one type the settings, the run and the GUI
use too): an error, a warning or a note, whose ``changes`` :meth:`PreflightReport.adjusted`
applies for the run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.problems import SEVERITIES, Problem, Severity

__all__ = ["SEVERITIES", "PreflightReport", "Problem", "SettingNotApplied", "Severity", "settings_applied_line"]

_HEADINGS = {"error": "Errors", "warning": "Warnings", "note": "Notes"}


@dataclass(frozen=True)
class SettingNotApplied(Problem):
    """A warning that a kohya_ss setting of the config is not applied (``trainer.preflight.ignored_settings``);
    its own type so that the step plan can count them without reading messages."""


def settings_applied_line(problems) -> str:
    """The step plan's word on the config: every setting applies, or how many are not applied."""
    n = sum(isinstance(p, SettingNotApplied) for p in problems)
    if not n:
        return "Settings: every setting applies."
    return f"Settings: {_count(n, 'kohya_ss setting')} {'is' if n == 1 else 'are'} not applied: see the warnings."


@dataclass
class PreflightReport:
    problems: list[Problem] = field(default_factory=list)
    plan: Any = None  # trainer.data.plan.StepPlan, or None when the folders could not be planned
    memory: Any = None  # trainer.preflight.memory.MemoryEstimate, or None
    deep: bool = True
    unverified_images: int = 0  # images not decoded yet (quick checks only)
    run_plan: Any = None  # trainer.run_plan.RunPlan: what a run does, when a full check lets it start

    @property
    def ok(self) -> bool:
        """True when training can start (warnings and notes allowed)."""
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        return self.by_severity("error")

    @property
    def warnings(self) -> list[Problem]:
        return self.by_severity("warning")

    @property
    def notes(self) -> list[Problem]:
        return self.by_severity("note")

    def by_severity(self, severity: Severity) -> list[Problem]:
        return [p for p in self.problems if p.severity == severity]

    def for_field(self, key: str) -> list[Problem]:
        """Problems about one setting (the GUI shows them next to its widget)."""
        return [p for p in self.problems if p.field == key]

    def changes(self) -> dict[str, Any]:
        """Every automatic adjustment as {key: value}; later problems win on the same key."""
        merged: dict[str, Any] = {}
        for problem in self.problems:
            merged.update(problem.changes)
        return merged

    def adjusted(self, settings):
        """``settings`` with the automatic adjustments applied (the ones the notes describe)."""
        changes = self.changes()
        if not changes:
            return settings
        return settings.model_copy(update=changes)

    def summary(self) -> str:
        counts = ", ".join(_count(len(self.by_severity(s)), s) for s in SEVERITIES)
        verdict = "training can start" if self.ok else "training cannot start"
        left_out = self.plan.train_images_left_out if self.ok and self.plan is not None else 0
        if left_out:
            verdict += f" with {self.plan.train_images} of {self.plan.train_images_found} images ({left_out} left out)"
        return f"Preflight: {counts}; {verdict}"

    def settings_applied(self) -> str:
        """``Settings: every setting applies.``, or how many kohya_ss settings are not applied (each has a warning)."""
        return settings_applied_line(self.problems)

    def format(self) -> str:
        """The report for the CLI: errors, warnings, notes, then the step plan and the memory estimate."""
        parts = [self.summary()]
        for severity in SEVERITIES:
            group = self.by_severity(severity)
            if group:
                parts.append(f"\n{_HEADINGS[severity]}:\n" + "\n".join(p.format(severity_column=True) for p in group))
        if self.unverified_images:
            parts.append(
                f"\n{_count(self.unverified_images, 'image')} not decoded yet (quick check); "
                "the full check before Start decodes every image."
            )
        if self.plan is not None:
            parts.append("\nStep plan:\n" + _indent(self.plan.summary() + "\n" + self.settings_applied()))
        else:
            parts.append("\n" + self.settings_applied())
        if self.memory is not None:
            parts.append("\nMemory estimate:\n" + _indent(self.memory.describe()))
        return "\n".join(parts) + "\n"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
