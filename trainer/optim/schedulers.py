"""Learning-rate schedulers by kohya name, with warmup as steps or % of the run.

The named schedules are transformers' ``get_scheduler`` functions (the same
functions diffusers and sd-scripts use), re-implemented in :mod:`.lr_lambdas` so
that starting a run does not import transformers or diffusers; ``lr_scheduler_type``
may name any ``torch.optim.lr_scheduler`` class or ``module.Class`` instead.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from .args import OptimConfigError, parse_literal_args
from .lr_lambdas import IGNORES_OPTIONS, lambda_scheduler

# name -> (takes warmup, extra kwargs from settings)
SCHEDULERS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "constant": (False, ()),
    "constant_with_warmup": (True, ()),
    "linear": (True, ()),
    "cosine": (True, ()),
    "cosine_with_restarts": (True, ("num_cycles",)),
    "polynomial": (True, ("power",)),
    "piecewise_constant": (False, ()),
    "inverse_sqrt": (True, ()),
    "cosine_with_min_lr": (True, ()),
    "warmup_stable_decay": (True, ()),
    "adafactor": (False, ()),
}
# defaults for schedules that would otherwise refuse to start without arguments
_SPECIFIC_DEFAULTS = {
    "cosine_with_min_lr": {"min_lr_rate": 0.0},
    "warmup_stable_decay": {"num_decay_steps": None},  # None: 10% of the run
    "piecewise_constant": {"step_rules": "1"},  # "1:10,0.1:20,0.01" style rules; "1" = constant
}


@dataclass
class SchedulerPlan:
    name: str
    warmup_steps: int
    total_steps: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    custom_class: str = ""  # lr_scheduler_type
    notes: list[str] = field(default_factory=list)


def warmup_steps(settings: Any, total_steps: int) -> int:
    """``lr_warmup_steps`` when > 0, else ``lr_warmup`` percent of the run (sd-scripts truncates)."""
    if settings.lr_warmup_steps > 0:
        return int(settings.lr_warmup_steps)
    return int(total_steps * settings.lr_warmup / 100)


def plan_scheduler(settings: Any, total_steps: int, override: str | None = None) -> SchedulerPlan:
    name = override or settings.lr_scheduler
    if name not in SCHEDULERS:
        raise OptimConfigError(f"unknown lr_scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}", "lr_scheduler")
    plan = SchedulerPlan(name, warmup_steps(settings, total_steps), total_steps,
                         parse_literal_args(settings.lr_scheduler_args, "lr_scheduler_args"),
                         custom_class=(settings.lr_scheduler_type or "").strip())
    takes_warmup, extras = SCHEDULERS[name]
    if plan.warmup_steps and not takes_warmup and not plan.custom_class:
        plan.notes.append(f"the {name} scheduler has no warmup; {plan.warmup_steps} warmup steps ignored "
                          "(choose constant_with_warmup to warm up)")
        plan.warmup_steps = 0
    if plan.custom_class:  # sd-scripts builds lr_scheduler_type's class from lr_scheduler_args alone
        return plan
    values = {"num_cycles": settings.lr_scheduler_num_cycles, "power": settings.lr_scheduler_power}
    for key in extras:
        plan.kwargs.setdefault(key, values[key])
    if name == "adafactor":  # AdafactorSchedule reports the lr Adafactor computes; initial_lr is for step 0
        plan.kwargs = {"initial_lr": float(settings.learning_rate)}
    if name in IGNORES_OPTIONS and plan.kwargs and not plan.custom_class:  # as transformers' get_scheduler, which drops them
        plan.notes.append(f"the {name} scheduler takes no lr_scheduler_args; {', '.join(plan.kwargs)} ignored")
    for key, default in _SPECIFIC_DEFAULTS.get(name, {}).items():
        plan.kwargs.setdefault(key, default if default is not None else max(1, total_steps // 10))
    if name == "cosine_with_min_lr" and "min_lr" in plan.kwargs and plan.kwargs["min_lr_rate"] == 0.0:
        del plan.kwargs["min_lr_rate"]  # min_lr given: the min_lr_rate default would clash with it
    return plan


def create_scheduler(plan: SchedulerPlan, optimizer):
    if plan.custom_class:
        return _custom_scheduler(plan, optimizer)
    if plan.name == "adafactor":
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise OptimConfigError("the adafactor scheduler works only with the Adafactor optimizer", "lr_scheduler")
        return AdafactorSchedule(optimizer, plan.kwargs.get("initial_lr", 0.0))
    try:
        return lambda_scheduler(plan.name, optimizer, plan.warmup_steps, plan.total_steps, plan.kwargs)
    except ValueError as exc:
        raise OptimConfigError(f"lr_scheduler {plan.name}: {exc}; check lr_scheduler_args", "lr_scheduler_args") from None


def _custom_scheduler(plan: SchedulerPlan, optimizer):
    module, _, cls_name = plan.custom_class.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "torch.optim.lr_scheduler"), cls_name)
    except (ImportError, AttributeError):
        raise OptimConfigError(f"unknown scheduler class {plan.custom_class!r}", "lr_scheduler_type") from None
    try:
        return cls(optimizer, **plan.kwargs)
    except TypeError as exc:
        raise OptimConfigError(f"{plan.custom_class}: {exc}; set its arguments in lr_scheduler_args", "lr_scheduler_args") from None
