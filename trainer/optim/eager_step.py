"""Run torch.optim optimizers without importing ``torch._dynamo`` (1.3-1.8 s of every training start).

torch's optimizers guard a few methods against ``torch.compile`` tracing: ``add_param_group``,
``zero_grad``, ``state_dict``... are wrapped by ``torch._disable_dynamo``, which imports
``torch._dynamo`` the first time a wrapped function runs, and the built-in optimizers' ``step``
imports it on every call to insert graph breaks. Nekoya never compiles the optimizer (only the
UNet, with ``dynamo_backend``), so those guards protect nothing here and cost a second or more
before the first step. ``skip_compile_guards()`` marks the guarded functions as already
"disabled" (the cache attribute ``_disable_dynamo`` looks for), and ``eager_step(optimizer)``
gives a built-in optimizer a ``step`` that runs its update under ``torch.no_grad()`` exactly as
``_use_grad_for_differentiable`` does, minus the graph breaks.

Both do nothing once ``torch._dynamo`` is imported (nothing left to save), and both find what they
patch by looking, not by version: a torch that changes these internals only loses the speed-up.
"""
from __future__ import annotations

import sys
import types

import torch
import torch.optim.optimizer as optimizer_module

# the code objects of torch's two wrappers, taken from the wrappers themselves
_DISABLE_CODE = torch._disable_dynamo(lambda: None).__code__
_USE_GRAD_CODE = optimizer_module._use_grad_for_differentiable(lambda self: None).__code__


def dynamo_loaded() -> bool:
    return "torch._dynamo" in sys.modules


def skip_compile_guards(cls: type) -> int:
    """Let the ``torch._disable_dynamo``-wrapped methods of optimizer class ``cls`` and the functions of
    its modules (``torch.optim.adam.adam``...) run without importing ``torch._dynamo``. Returns how many
    it marked; process-wide and idempotent."""
    if dynamo_loaded():
        return 0
    marked = 0
    for candidate in _candidates(cls):
        raw = getattr(candidate, "__wrapped__", None)
        if raw is None or not _wraps_disable(candidate):
            continue
        if getattr(raw, "__dynamo_disable", None) is None:
            raw.__dynamo_disable = raw  # what the wrapper calls instead of torch._dynamo.disable(raw)
        marked += 1
    return marked


def _candidates(cls: type) -> list:
    found = []
    for klass in cls.__mro__:
        found.extend(vars(klass).values())
        module = sys.modules.get(klass.__module__)
        if module is not None and klass.__module__.startswith("torch.optim"):
            found.extend(vars(module).values())
    return found


def eager_step(optimizer: torch.optim.Optimizer) -> bool:
    """Give ``optimizer`` (an instance) a ``step`` without torch's compile graph breaks, when its class's
    step is wrapped by ``_use_grad_for_differentiable``. Returns whether it did."""
    if dynamo_loaded() or optimizer.defaults.get("differentiable"):
        return False
    raw = _unwrap_use_grad(type(optimizer).step)
    if raw is None:
        return False
    hooked_raw = optimizer_module.Optimizer.profile_hook_step(raw)  # torch's step hooks and profiler label

    def step(self, closure=None):
        with torch.no_grad():  # what _use_grad_for_differentiable sets for a non-differentiable optimizer
            return hooked_raw(self, closure)

    optimizer.step = types.MethodType(step, optimizer)
    return True


def _wraps_disable(candidate: object) -> bool:
    """True for a ``torch._disable_dynamo`` wrapper, or a wrapper that calls one (the functional
    optimizers' ``maybe_fallback`` holds its disabled function in a closure cell)."""
    code = getattr(candidate, "__code__", None)
    if code is _DISABLE_CODE:
        return True
    cells = getattr(candidate, "__closure__", None) or ()
    return any(getattr(_cell_value(c), "__code__", None) is _DISABLE_CODE for c in cells)


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _unwrap_use_grad(function):
    """The function under ``_use_grad_for_differentiable`` in a ``__wrapped__`` chain, or None."""
    seen = 0
    while function is not None and seen < 8:
        if getattr(function, "__code__", None) is _USE_GRAD_CODE:
            return function.__wrapped__
        function, seen = getattr(function, "__wrapped__", None), seen + 1
    return None
