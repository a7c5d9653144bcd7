"""The plan of a run, decided once by the preflight check and carried out by ``trainer.loop.train``.

Every decision the check reports is one the run then follows, never makes again: the step
plan, the precision that runs on this device, the optimizer and scheduler plans, the LoRA
network spec and the memory estimate. Torch-free, as the check is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.network_spec import NetworkSpec
from trainer.optim import OptimizerPlan, SchedulerPlan, plan_optimizer, plan_scheduler
from trainer.optim.rules import PrecisionChoice


@dataclass(frozen=True)
class RunPlan:
    settings: Any  # the settings with the check's adjustments applied (the ones its notes describe)
    steps: Any  # trainer.data.plan.StepPlan
    precision: PrecisionChoice
    optimizer: OptimizerPlan
    scheduler: SchedulerPlan
    network: NetworkSpec
    memory: Any  # trainer.preflight.memory.MemoryEstimate, or None
    findings: tuple = ()  # the check's warnings and notes (trainer.problems.Problem), for the run log

    @property
    def notes(self) -> list[str]:
        """What the optimizer and scheduler plans decided that the check's findings do not say."""
        return self.optimizer.notes + self.scheduler.notes

    @property
    def settings_applied(self) -> str:
        """``Settings: every setting applies.``, or how many kohya_ss settings the run does not apply (for the log)."""
        from trainer.preflight.report import settings_applied_line  # late: trainer.preflight imports this module

        return settings_applied_line(self.findings)


def make_run_plan(settings: Any, steps: Any, precision: PrecisionChoice, memory: Any = None,
                  findings: tuple = ()) -> RunPlan:
    """The plan for ``settings`` (already adjusted); raises the settings' own error (OptimConfigError,
    NetworkConfigError) where the check has not refused them already."""
    optimizer = plan_optimizer(settings, precision.device)
    scheduler = plan_scheduler(settings, steps.total_steps, optimizer.scheduler_override)
    return RunPlan(settings, steps, precision, optimizer, scheduler, NetworkSpec.from_settings(settings), memory,
                   tuple(findings))
