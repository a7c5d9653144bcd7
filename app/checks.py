"""Check the form before a run: settings validation, then the preflight check.

Used live by the step plan panel and by Start (where errors block the run).
If a preflight check itself crashes, the step plan's own errors and warnings are shown.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from trainer.problems import SEVERITIES, Problem
from trainer.settings import SettingsError, TrainingSettings

from .form import settings_from_form


@dataclass
class CheckResult:
    settings: TrainingSettings | None
    problems: list[Problem] = field(default_factory=list)
    plan: Any = None  # trainer.data.plan.StepPlan when the settings are valid
    memory: str = ""  # the preflight's memory estimate, in words

    @property
    def ok(self) -> bool:
        return self.settings is not None and not self.errors

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def readiness(self) -> str:
        """"Ready to train.", or how many images a run would use when some are left out; "" when it cannot start."""
        if not self.ok:
            return ""
        ready = self.plan.readiness() if self.plan is not None else "Ready to train."
        return f"{ready} {settings_applied_line(self.problems)}"


def settings_applied_line(problems: list[Problem]) -> str:
    from trainer.preflight.report import settings_applied_line as line

    return line(problems)


def check_form(values: Mapping[str, Any], kept: Mapping[str, Any] | None = None) -> CheckResult:
    """Validate the form and run the quick preflight (the trainer runs the full one before loading weights)."""
    try:
        settings = settings_from_form(values, kept)
    except SettingsError as err:
        return CheckResult(None, list(err.problems))
    return check_settings(settings)


def check_settings(settings: TrainingSettings) -> CheckResult:
    from trainer.preflight import check

    try:
        report = check(settings, deep=False)  # quick: images decoded within a small time budget, cached
    except Exception as err:  # a bug in a check must not hide the plan or block the page
        result = _plan_only(settings)
        result.problems.append(Problem("warning", None, f"The preflight check itself failed ({type(err).__name__}: {err}); only the step plan was checked."))
        return result
    memory = report.memory
    return CheckResult(settings, _sorted(report.problems), report.plan, memory.describe() if memory else "")


def _plan_only(settings: TrainingSettings) -> CheckResult:
    from trainer.data.plan import plan_steps

    plan = plan_steps(settings)
    problems = [Problem("error", "train_data_dir", e) for e in plan.errors]
    problems += [Problem("warning", None, w) for w in plan.warnings]
    return CheckResult(settings, problems, plan)


def _sorted(problems: list[Problem]) -> list[Problem]:
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(problems, key=lambda p: rank.get(p.severity, len(rank)))
