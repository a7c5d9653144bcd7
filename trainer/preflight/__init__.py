"""Preflight: every problem of a run, found in seconds before any model weights are loaded.

``check(settings)`` is the one entry point for the CLI (``python -m trainer check``),
the GUI (``deep=False`` on every edit: images are decoded only within a short time
budget, results are cached, so it stays fast; ``deep=True`` before Start) and the
trainer (before loading weights). It never raises on bad input: a check that
crashes becomes an error naming that check.

The checks live in one module per concern (dataset, model, optimizer, network,
output, training, memory), registered by name in ``registry.CHECKS``.
"""
from __future__ import annotations

from trainer.preflight.registry import CHECKS, CheckContext, run_checks
from trainer.preflight.report import Problem, PreflightReport
from trainer.network_spec import NetworkConfigError
from trainer.optim import OptimConfigError
from trainer.run_plan import make_run_plan

# Importing a concern module registers its checks, in this order.
from trainer.preflight import dataset, model, network, lycoris, network_types, blocks, client_support, optimizer, training, additional_parameters, output, memory, ignored_settings, logging_check, masked_loss, processes, flux, sd3  # noqa: E402,F401,E501

__all__ = ["check", "CHECKS", "Problem", "PreflightReport"]


def check(settings, *, deep: bool = True, checks=None, image_budget_s: float | None = None) -> PreflightReport:
    """Run the checks (all, or the names in ``checks``) and return the report.

    ``deep=False`` is the GUI's quick check: images are decoded only for 0.3 s per
    call (the rest on later calls, cached) and ``.ckpt`` LoRA files are not opened;
    ``image_budget_s`` changes that budget.
    """
    ctx = CheckContext(settings, deep=deep, image_budget_s=image_budget_s)
    problems, _ = run_checks(ctx, checks)
    report = PreflightReport(problems=problems, deep=deep, unverified_images=ctx.unverified_images)
    report.plan = _safe(lambda: ctx.plan)
    report.memory = _safe(lambda: ctx.memory)
    if deep and report.ok and checks is None:
        _plan_run(ctx, report)
    return report


def _plan_run(ctx: CheckContext, report: PreflightReport) -> None:
    """The run plan from the check's own decisions; a decision that cannot be made becomes an error."""
    steps = ctx.plan  # the dataset checks have judged its findings: the ones they let pass do not stop a run
    if steps is None or steps.total_steps <= 0:
        report.problems.append(Problem("error", "train_data_dir", "the plan has 0 steps: no usable training images"))
        return
    try:
        report.run_plan = make_run_plan(report.adjusted(ctx.settings), steps, ctx.precision, report.memory,
                                        tuple(report.warnings + report.notes))
    except (OptimConfigError, NetworkConfigError) as exc:
        report.problems.append(Problem("error", exc.field, str(exc)))


def _safe(compute):
    try:
        return compute()
    except Exception:  # already reported by the check that owns it
        return None
