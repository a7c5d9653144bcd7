"""The named learning-rate schedules as ``LambdaLR`` multipliers, without transformers or diffusers.

Importing transformers/diffusers only for these few formulas cost seconds at every training start.
Each lambda here copies its formula from transformers 5 ``optimization.py`` (or diffusers 0.42 for
``piecewise_constant``) operation for operation, so the learning rates are the same floats. The
lambdas are ``functools.partial`` objects of module-level functions, as in transformers: the
scheduler pickles and its ``state_dict()`` has the same shape as before (``{}`` per lambda).
Importing this module does not import torch; :func:`lambda_scheduler` does.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

LrLambda = Callable[[int], float]
SHAPES = ("linear", "cosine", "1-sqrt")  # warmup_stable_decay warmup_type / decay_type


# -- the multipliers (formulas as in transformers.optimization) ------------------------------------------------------
def _constant_lambda(_=None):
    return 1


def _warmup_ramp(current_step: int, num_warmup_steps: int) -> float:
    return float(current_step) / float(max(1, num_warmup_steps))


def _constant_with_warmup_lambda(current_step: int, *, num_warmup_steps: int):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1.0, num_warmup_steps))
    return 1.0


def _linear_lambda(current_step: int, *, num_warmup_steps: int, num_training_steps: int):
    if current_step < num_warmup_steps:
        return _warmup_ramp(current_step, num_warmup_steps)
    return max(0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)))


def _cosine_lambda(current_step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float,
                   min_lr_rate: float = 0.0):
    """``cosine`` and ``cosine_with_min_lr`` (transformers uses this one function for both)."""
    if current_step < num_warmup_steps:
        return _warmup_ramp(current_step, num_warmup_steps)
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0, factor)


def _cosine_restarts_lambda(current_step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: int):
    if current_step < num_warmup_steps:
        return _warmup_ramp(current_step, num_warmup_steps)
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def _polynomial_lambda(current_step: int, *, num_warmup_steps: int, num_training_steps: int, lr_end: float,
                       power: float, lr_init: float):
    if current_step < num_warmup_steps:
        return _warmup_ramp(current_step, num_warmup_steps)
    decay_steps = num_training_steps - num_warmup_steps
    # transformers divides by zero here when warmup fills the whole run; this is the end of the decay
    if current_step > num_training_steps or decay_steps == 0:
        return lr_end / lr_init  # LambdaLR multiplies by lr_init
    lr_range = lr_init - lr_end
    pct_remaining = 1 - (current_step - num_warmup_steps) / decay_steps
    decay = lr_range * pct_remaining**power + lr_end
    return decay / lr_init


def _inverse_sqrt_lambda(current_step: int, *, num_warmup_steps: int, timescale: int):
    if current_step < num_warmup_steps:
        return _warmup_ramp(current_step, num_warmup_steps)
    shift = timescale - num_warmup_steps
    return 1.0 / math.sqrt((current_step + shift) / timescale)


def _warmup_shape(kind: str, progress: float) -> float:
    if kind == "linear":
        return progress
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * progress))
    return 1.0 - math.sqrt(1.0 - progress)  # 1-sqrt


def _decay_shape(kind: str, progress: float, num_cycles: float) -> float:
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    return 1.0 - math.sqrt(progress)  # 1-sqrt


def _wsd_lambda(current_step: int, *, num_warmup_steps: int, num_stable_steps: int, num_decay_steps: int,
                warmup_type: str, decay_type: str, min_lr_ratio: float, num_cycles: float):
    if current_step < num_warmup_steps:
        factor = _warmup_shape(warmup_type, float(current_step) / float(max(1, num_warmup_steps)))
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    if current_step < num_warmup_steps + num_stable_steps:
        return 1.0
    if current_step < num_warmup_steps + num_stable_steps + num_decay_steps:
        progress = float(current_step - num_warmup_steps - num_stable_steps) / float(max(1, num_decay_steps))
        factor = _decay_shape(decay_type, progress, num_cycles)
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


def _piecewise_lambda(steps: int, *, rules: tuple[tuple[int, float], ...], last: float) -> float:
    for boundary, value in rules:  # sorted by boundary
        if steps < boundary:
            return value
    return last


# -- schedule name -> multiplier, from the run's numbers and the user's options -----------------------------------
# Each takes (num_warmup_steps, num_training_steps, lr_init) and keyword-only options: the keyword names are the
# options a user may set in lr_scheduler_args, with transformers' defaults.
def _constant(warmup: int, total: int, lr_init: float) -> LrLambda:
    return _constant_lambda


def _constant_with_warmup(warmup: int, total: int, lr_init: float) -> LrLambda:
    return partial(_constant_with_warmup_lambda, num_warmup_steps=warmup)


def _linear(warmup: int, total: int, lr_init: float) -> LrLambda:
    return partial(_linear_lambda, num_warmup_steps=warmup, num_training_steps=total)


def _cosine(warmup: int, total: int, lr_init: float, *, num_cycles: float = 0.5) -> LrLambda:
    return partial(_cosine_lambda, num_warmup_steps=warmup, num_training_steps=total, num_cycles=num_cycles,
                   min_lr_rate=0.0)


def _cosine_with_restarts(warmup: int, total: int, lr_init: float, *, num_cycles: int = 1) -> LrLambda:
    return partial(_cosine_restarts_lambda, num_warmup_steps=warmup, num_training_steps=total, num_cycles=num_cycles)


def _polynomial(warmup: int, total: int, lr_init: float, *, lr_end: float = 1e-7, power: float = 1.0) -> LrLambda:
    if not (lr_init > lr_end):
        raise ValueError(f"lr_end ({lr_end}) must be smaller than initial lr ({lr_init})")
    return partial(_polynomial_lambda, num_warmup_steps=warmup, num_training_steps=total, lr_end=lr_end, power=power,
                   lr_init=lr_init)


def _inverse_sqrt(warmup: int, total: int, lr_init: float, *, timescale: int | None = None) -> LrLambda:
    if timescale is None:
        timescale = warmup or 10_000
    return partial(_inverse_sqrt_lambda, num_warmup_steps=warmup, timescale=timescale)


def _cosine_with_min_lr(warmup: int, total: int, lr_init: float, *, num_cycles: float = 0.5,
                        min_lr: float | None = None, min_lr_rate: float | None = None) -> LrLambda:
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError("Only one of min_lr or min_lr_rate should be set")
    if min_lr is not None:
        min_lr_rate = min_lr / lr_init
    elif min_lr_rate is None:
        raise ValueError("One of min_lr or min_lr_rate should be set")
    return partial(_cosine_lambda, num_warmup_steps=warmup, num_training_steps=total, num_cycles=num_cycles,
                   min_lr_rate=min_lr_rate)


def _warmup_stable_decay(warmup: int, total: int, lr_init: float, *, num_decay_steps: int | None = None,
                         num_stable_steps: int | None = None, warmup_type: str = "linear", decay_type: str = "cosine",
                         min_lr_ratio: float = 0, num_cycles: float = 0.5) -> LrLambda:
    if num_decay_steps is None:
        raise ValueError("num_decay_steps is needed")
    for key, value in (("warmup_type", warmup_type), ("decay_type", decay_type)):
        if value not in SHAPES:
            raise ValueError(f"Unknown {key}: {value}, expected 'linear', 'cosine' or '1-sqrt'")
    if num_stable_steps is None:  # transformers: the stable phase fills what warmup and decay leave
        num_stable_steps = total - warmup - num_decay_steps
    return partial(_wsd_lambda, num_warmup_steps=warmup, num_stable_steps=num_stable_steps,
                   num_decay_steps=num_decay_steps, warmup_type=warmup_type, decay_type=decay_type,
                   min_lr_ratio=min_lr_ratio, num_cycles=num_cycles)


def _piecewise_constant(warmup: int, total: int, lr_init: float, *, step_rules: str = "1") -> LrLambda:
    return partial(_piecewise_lambda, **parse_step_rules(step_rules))


def parse_step_rules(step_rules: str | float) -> dict[str, Any]:
    """diffusers' ``"1:10,0.1:20,0.01"``: multiplier 1 before step 10, 0.1 before step 20 (the numbers are
    step indices, not lengths), 0.01 after; a repeated step keeps its last multiplier."""
    if isinstance(step_rules, (int, float)) and not isinstance(step_rules, bool):
        step_rules = str(step_rules)  # step_rules=0.5 reads as a number
    if not isinstance(step_rules, str):
        raise ValueError(f"step_rules must be text such as \"1:10,0.1:20,0.01\", not {step_rules!r}")
    *pairs, last = step_rules.split(",")
    rules: dict[int, float] = {}
    try:
        for rule in pairs:
            value, steps = rule.split(":")
            rules[int(steps)] = float(value)
        return {"rules": tuple(sorted(rules.items())), "last": float(last)}
    except ValueError:
        raise ValueError(f"step_rules {step_rules!r} is not multiplier:step pairs then a last multiplier, "
                         "e.g. \"1:10,0.1:20,0.01\"") from None


SCHEDULES: dict[str, Callable[..., LrLambda]] = {
    "constant": _constant,
    "constant_with_warmup": _constant_with_warmup,
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
    "inverse_sqrt": _inverse_sqrt,
    "cosine_with_min_lr": _cosine_with_min_lr,
    "warmup_stable_decay": _warmup_stable_decay,
    "piecewise_constant": _piecewise_constant,
}
# transformers' get_scheduler drops scheduler_specific_kwargs for these two
IGNORES_OPTIONS = frozenset({"constant", "constant_with_warmup"})


def schedule_options(name: str) -> tuple[str, ...]:
    """The option names ``name`` takes; :func:`lambda_scheduler` also takes ``last_epoch`` (for ``LambdaLR``)."""
    return tuple(SCHEDULES[name].__kwdefaults__ or ())  # every option has a default


def lr_lambda(name: str, num_warmup_steps: int, num_training_steps: int, lr_init: float,
              options: dict[str, Any] | None = None) -> LrLambda:
    """The multiplier of schedule ``name``; ``lr_init`` is ``optimizer.defaults["lr"]`` (polynomial and
    ``min_lr`` are relative to it). Raises ``ValueError`` for an unknown name or option, or a bad value
    (the message does not repeat the schedule's name)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    options = {} if name in IGNORES_OPTIONS else dict(options or {})
    unknown = sorted(set(options) - set(schedule_options(name)))
    if unknown:
        takes = ", ".join(schedule_options(name)) or "none"
        raise ValueError(f"no option {', '.join(unknown)} (its options: {takes})")
    try:
        fn = SCHEDULES[name](num_warmup_steps, num_training_steps, lr_init, **options)  # ValueError: a bad value
    except TypeError as exc:  # a value of the wrong kind
        raise ValueError(f"options {options}: {exc}") from None
    try:  # a value that only fails when used fails now, not mid-run
        for step in sorted({0, num_warmup_steps, num_training_steps}):
            fn(step)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
        raise ValueError(f"options {options} fail at step {step}: {exc}") from None
    return fn


def lambda_scheduler(name: str, optimizer, num_warmup_steps: int, num_training_steps: int,
                     options: dict[str, Any] | None = None):
    """``torch.optim.lr_scheduler.LambdaLR`` for schedule ``name``, as transformers' ``get_scheduler``
    (diffusers' for ``piecewise_constant``) builds it; ``last_epoch`` in ``options`` goes to ``LambdaLR``."""
    from torch.optim.lr_scheduler import LambdaLR

    options = {} if name in IGNORES_OPTIONS else dict(options or {})
    last_epoch = options.pop("last_epoch", -1)
    fn = lr_lambda(name, num_warmup_steps, num_training_steps, optimizer.defaults["lr"], options)
    return LambdaLR(optimizer, fn, last_epoch=last_epoch)
