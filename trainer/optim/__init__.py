"""Optimizers, learning-rate schedules, precision and the optimizer step."""
from .args import OptimConfigError, parse_literal_args
from .optimizers import OPTIMIZERS, OptimizerPlan, plan_optimizer
from .schedulers import SCHEDULERS, SchedulerPlan, create_scheduler, plan_scheduler, warmup_steps

__all__ = [
    "OptimConfigError", "parse_literal_args", "OPTIMIZERS", "OptimizerPlan", "plan_optimizer", "SCHEDULERS",
    "SchedulerPlan", "create_scheduler", "plan_scheduler", "warmup_steps",
]
