"""Optimizers by kohya name (the table: ``trainer.optim.table``), planned before any model is loaded.

``plan_optimizer(settings, device_type)`` reads the name and arguments and applies
sd-scripts' rules (SGDNesterov momentum, Adafactor ``relative_step``: ``trainer.optim.rules``,
whose notes the preflight check reports); the returned plan imports the class and
creates the optimizer once the LoRA parameters exist.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .args import OptimConfigError, parse_literal_args
from .rules import adafactor_relative_step
from .table import OPTIMIZERS, OptimizerKind, optimizer_kind


@dataclass
class OptimizerPlan:
    name: str
    kind: OptimizerKind | None  # None: a "module.Class" path or a torch.optim class name
    kwargs: dict[str, Any]
    lr: float | None  # default lr passed to the constructor
    notes: list[str] = field(default_factory=list)  # shown to the user as Log events
    scheduler_override: str | None = None  # "adafactor" when Adafactor picks its own step size
    keep_group_lrs: bool = True

    same_group_lr: bool = False  # D-Adaptation / Prodigy refuse groups with different lrs

    @cached_property
    def cls(self) -> type:
        """The optimizer class, imported on first use (the plan itself is made without torch)."""
        return _load_class(self.name, self.kind)

    def create(self, param_groups: list[dict]):
        from .eager_step import eager_step, skip_compile_guards  # imports torch

        groups = [dict(g) for g in param_groups]
        if not self.keep_group_lrs:
            for g in groups:
                g.pop("lr", None)
        elif self.same_group_lr:
            self._equalize_lrs(groups)
        skip_compile_guards(self.cls)
        optimizer = self.cls(groups, lr=self.lr, **self.kwargs)
        eager_step(optimizer)
        if self.kind is not None and self.kind.schedule_free:  # it steps only in train mode
            optimizer.train()
        return optimizer

    def _equalize_lrs(self, groups: list[dict]) -> None:
        """Give every group the first group's lr; DAdaptAdam keeps the ratio as layer_scale."""
        base = groups[0]["lr"] if groups else self.lr
        if all(g["lr"] == base for g in groups):
            return
        keeps_ratio = "layer_scale" in _constructor_args(self.cls)
        for g in groups:
            if keeps_ratio:
                g["layer_scale"] = g["lr"] / base
            g["lr"] = base
        how = "the ratio is kept as layer_scale" if keeps_ratio else "the others use it too"
        self.notes.append(f"{self.name} needs one learning rate for all groups: {base} from the first group; {how}")

    def description(self) -> str:
        """``ss_optimizer``: ``module.Class(k=v,...)`` as sd-scripts writes it."""
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.cls.__module__}.{self.cls.__name__}" + (f"({args})" if args else "")


def plan_optimizer(settings: Any, device_type: str) -> OptimizerPlan:
    name = (settings.optimizer or "AdamW").strip()
    kind = optimizer_kind(name)
    kwargs = {**(kind.defaults if kind else {}), **parse_literal_args(settings.optimizer_args, "optimizer_args")}
    plan = OptimizerPlan(name, kind, kwargs, lr=float(settings.learning_rate))
    _apply_rules(plan, kind, settings, device_type)
    return plan


def _load_class(name: str, kind: OptimizerKind | None) -> type:
    if kind is not None:
        try:
            return kind.load()
        except ImportError as exc:
            raise OptimConfigError(f"optimizer {name} needs the package '{kind.package}' ({exc}); install it or choose AdamW", "optimizer") from None
    module, _, cls_name = name.rpartition(".")
    try:  # sd-scripts also accepts any "module.Class", or a bare torch.optim class name
        return getattr(importlib.import_module(module or "torch.optim"), cls_name)
    except (ImportError, AttributeError):
        known = ", ".join(sorted(OPTIMIZERS))
        raise OptimConfigError(f"unknown optimizer {name!r}; choose one of {known} or a module.Class path", "optimizer") from None


def _apply_rules(plan: OptimizerPlan, kind: OptimizerKind | None, settings: Any, device_type: str) -> None:
    name = plan.name.lower()
    if name == "adafactor":
        _adafactor_rules(plan, settings)
    if name == "adamw" and device_type in ("cuda", "cpu") and not {"fused", "foreach"} & set(plan.kwargs):
        # one kernel for all parameters: on a CPU with ~100 LoRA tensors 1.1 ms a step against 6.3 ms
        # (single-tensor, torch's CPU default) and 4.0 ms (foreach)
        plan.kwargs["fused"] = True
    if kind is not None and kind.adaptive_lr:
        plan.same_group_lr = True
    if kind is not None and kind.adaptive_lr and plan.lr is not None and plan.lr <= 0.1:
        plan.notes.append(f"{plan.name} adapts its own step size; a learning rate around 1.0 is recommended (now {plan.lr})")
    if name.startswith("paged") and device_type != "cuda":
        plan.notes.append(f"{plan.name}: paged optimizers need CUDA; bitsandbytes runs it unpaged here")


def _constructor_args(cls: type) -> set[str]:
    try:
        return set(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        return set()


def _adafactor_rules(plan: OptimizerPlan, settings: Any) -> None:
    """sd-scripts' Adafactor rules, with the cases that crash there decided instead (the preflight
    check's notes say what changed: trainer.preflight.optimizer)."""
    if adafactor_relative_step(plan.kwargs):
        # Adafactor computes its own step size: no lr, no per-group lrs, its own schedule.
        plan.kwargs["relative_step"] = True
        plan.keep_group_lrs = False
        plan.scheduler_override = "adafactor"
        plan.lr = None
    elif settings.lr_scheduler == "adafactor":
        plan.scheduler_override = "constant"
