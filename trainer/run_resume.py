"""How a run goes on from a state folder: a whole one (``trainer.run_setup.resume_from``), or one that
holds LoRA weights only (``trainer.extend`` writes it for a run saved without state): a fresh optimizer.

Either way the learning rate is set from the schedule planned now, at the step the run goes on from: a run
extended past its first plan continues the schedule as if it had been planned that long.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from trainer.run_setup import resume_from


def continue_run(state: Any, network: Any, stepper: Any, generator: torch.Generator, path: str,
                 log: Callable[..., None], processes: int = 1) -> tuple[int, int, int]:
    """Load ``state`` into the run; returns where it goes on: (step, epoch, batches done in that epoch). A
    state saved by a run of another number of processes goes on from the start of its epoch (its batches
    were of another size)."""
    if state.stepper_state:
        position = resume_from(state, network, stepper, generator, path, log)
    else:
        network.load_lora_state_dict(state.lora_tensors)
        p = state.position
        position = p.step, p.epoch, p.batches_done
        log(f"went on from the LoRA weights in {path} at step {p.step} (epoch {p.epoch}) with a fresh optimizer: "
            "the run saved no training state, so the optimizer's moments start again from zero")
    continue_schedule(stepper.scheduler, position[0], stepper.optimizer, log)
    saved_by = getattr(state.position, "processes", 1)
    if saved_by != processes and position[2]:
        log(f"{path} was saved by a run of {saved_by} process(es), this run has {processes}: the weights, optimizer "
            f"and step count ({position[0]}) go on, but the epoch's batches are split differently, so epoch "
            f"{position[1]} starts again from its first batch (the step plan is this run's)", "warning")
        position = (position[0], position[1], 0)
    elif saved_by != processes:
        log(f"{path} was saved by a run of {saved_by} process(es), this run has {processes}: the weights, optimizer "
            "and step count go on with the new batch size per step", "warning")
    return position


def continue_schedule(scheduler: Any, step: int, optimizer: Any, log: Callable[..., None]) -> None:
    """Set each group's learning rate from the schedule planned now at ``step`` (Nekoya's LambdaLR schedules;
    others, such as a custom class or AdafactorSchedule, go on from their saved state as they are)."""
    if type(scheduler) is not torch.optim.lr_scheduler.LambdaLR:
        return
    lambdas, base_lrs = scheduler.lr_lambdas, scheduler.base_lrs
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(base_lrs, lambdas)]
    before = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step
    if any(abs(a - b) > 1e-12 * max(abs(a), abs(b), 1e-30) for a, b in zip(before, lrs)):
        log(f"the learning-rate schedule goes on at step {step} as if the run had been planned this long: "
            f"learning rate {before[0]:.3g} -> {lrs[0]:.3g}")
