"""The table of preflight checks and the shared context they read.

Each concern module (dataset, model, optimizer, network, output, memory) registers
small named check functions with :func:`preflight_check`. A check takes the
:class:`CheckContext` and returns (or yields) ``Problem``s; it never needs to catch
its own bugs, :func:`run_checks` turns an exception into an error naming the check.
"""
from __future__ import annotations

import time
from functools import cached_property
from typing import Callable, Iterable

from trainer.preflight.report import Problem

CheckFunction = Callable[["CheckContext"], Iterable[Problem]]

CHECKS: dict[str, CheckFunction] = {}


def preflight_check(name: str) -> Callable[[CheckFunction], CheckFunction]:
    """Register ``fn`` as check ``name`` (e.g. "dataset.layout"); names are unique."""

    def register(fn: CheckFunction) -> CheckFunction:
        if name in CHECKS and CHECKS[name] is not fn:
            raise ValueError(f"preflight check {name!r} is registered twice")
        CHECKS[name] = fn
        return fn

    return register


class CheckContext:
    """The settings under check plus the expensive facts several checks share, computed once."""

    def __init__(self, settings, *, deep: bool = True, image_budget_s: float | None = None) -> None:
        self.settings = settings
        self.deep = deep
        # Quick checks (the GUI on every edit) decode images only within this time budget.
        self.image_budget_s = None if deep else (0.3 if image_budget_s is None else image_budget_s)
        self.unverified_images = 0
        self.plan_error: Exception | None = None

    @cached_property
    def _dataset_config_scans(self):
        """(train, reg) scans of the subsets of the settings' dataset config file, or None without one."""
        from trainer.data.dataset_config import dataset_config_path
        from trainer.data.folders import scan_settings_dataset_config

        return scan_settings_dataset_config(self.settings) if dataset_config_path(self.settings) else None

    @cached_property
    def train_scan(self):
        """The training images: the Image folder's, or the dataset config's training subsets'."""
        from trainer.data.folders import scan_dataset_dir

        if self._dataset_config_scans is not None:
            return self._dataset_config_scans[0]
        s = self.settings
        return scan_dataset_dir(s.train_data_dir, is_reg=False, caption_extension=s.caption_extension)

    @cached_property
    def reg_scan(self):
        """The regularisation images (None without any): the Regularisation folder's, or the reg subsets'."""
        from trainer.data.folders import scan_dataset_dir

        if self._dataset_config_scans is not None:
            return self._dataset_config_scans[1]
        s = self.settings
        if not s.reg_data_dir:
            return None
        return scan_dataset_dir(s.reg_data_dir, is_reg=True, caption_extension=s.caption_extension)

    @cached_property
    def plan(self):
        """The step plan (trainer.data.plan.StepPlan), or None when it cannot be computed."""
        from trainer.data.plan import plan_steps

        try:
            return plan_steps(self.settings)
        except Exception as exc:  # reported by the dataset.plan check
            self.plan_error = exc
            return None

    @cached_property
    def total_steps(self) -> int | None:
        plan = self.plan
        return plan.total_steps if plan is not None and plan.total_steps > 0 else None

    @cached_property
    def model(self):
        """What the base model file is (trainer.preflight.model.ModelFacts), or None if unknown."""
        from trainer.preflight.model import inspect_base_model

        return inspect_base_model(self)

    @cached_property
    def memory(self):
        """The memory estimate (trainer.preflight.memory.MemoryEstimate) for these settings on this device."""
        from trainer.preflight.families import checked_family
        from trainer.preflight.memory import estimate_memory

        family = checked_family(self.settings, self.model.family if self.model is not None else None)
        return estimate_memory(self.settings, family, self.device)

    @cached_property
    def precision(self):
        """What mixed precision runs on this device (trainer.optim.rules.PrecisionChoice)."""
        return self.device.precision(self.settings)

    @cached_property
    def device(self):
        from trainer.preflight.device import probe_device

        return probe_device()


def run_checks(ctx: CheckContext, names: Iterable[str] | None = None) -> tuple[list[Problem], dict[str, float]]:
    """Run the named checks (all by default) in table order; returns problems and seconds per check."""
    problems: list[Problem] = []
    timings: dict[str, float] = {}
    for name in names if names is not None else list(CHECKS):
        start = time.perf_counter()
        try:
            problems.extend(CHECKS[name](ctx) or ())
        except Exception as exc:  # a bug in one check must not hide the others' findings
            problems.append(
                Problem(
                    "error", None,
                    f"the check {name!r} failed unexpectedly: {type(exc).__name__}: {exc}",
                    fix="the other checks still ran; please report this with your config",
                )
            )
        timings[name] = time.perf_counter() - start
    return problems, timings
