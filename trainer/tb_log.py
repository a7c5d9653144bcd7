"""A run's logs: TensorBoard (with sd-scripts' tag names) and Weights & Biases, as ``log_with`` says.

Tags: ``loss/current`` and ``loss/average`` per step, ``loss/epoch`` per epoch,
``lr/<group>`` per step (``lr/unet``, ``lr/textencoder``). Each run writes to its own
``<logging_dir>/<output_name><YYYYmmddHHMMSS>`` folder, as sd-scripts' log prefix.

``log_with`` as sd-scripts reads it: "" or "tensorboard" writes TensorBoard logs when a Logging folder is
set; "wandb" writes a W&B run only (``trainer.wandb_log``, offline unless asked); "all" both. ``open_log``
returns one object with ``step``/``epoch``/``close`` that fans out to each (``RunLoggers``).
"""
from __future__ import annotations

import os
import time
from typing import Any

TRACKERS = ("tensorboard", "wandb")


class TensorBoardLog:
    def __init__(self, logging_dir: str, output_name: str, folder: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder or run_folder(logging_dir, output_name)
        self.writer = SummaryWriter(self.folder)

    def step(self, step: int, loss: float, avg_loss: float, lrs: dict[str, float]) -> None:
        self.writer.add_scalar("loss/current", loss, step)
        self.writer.add_scalar("loss/average", avg_loss, step)
        for name, lr in lrs.items():
            self.writer.add_scalar(f"lr/{name}", lr, step)

    def epoch(self, epoch: int, avg_loss: float) -> None:
        self.writer.add_scalar("loss/epoch", avg_loss, epoch)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class NoLog:
    """Stands in when no logging_dir is set."""

    folder = None

    def step(self, *args, **kwargs) -> None:
        pass

    def epoch(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class RunLoggers:
    """Every log of a run behind one ``step``/``epoch``/``close``; ``folder`` is the first one's."""

    def __init__(self, loggers: list) -> None:
        self.loggers = loggers
        self.folder = next((log.folder for log in loggers), None)

    def step(self, step: int, loss: float, avg_loss: float, lrs: dict[str, float]) -> None:
        for log in self.loggers:
            log.step(step, loss, avg_loss, lrs)

    def epoch(self, epoch: int, avg_loss: float) -> None:
        for log in self.loggers:
            log.epoch(epoch, avg_loss)

    def close(self) -> None:
        """Closes every log, also when one fails to (the first failure is raised after)."""
        failure = None
        for log in self.loggers:
            try:
                log.close()
            except Exception as exc:  # noqa: BLE001  (the others still flush their files)
                failure = failure or exc
        if failure is not None:
            raise failure


def run_folder(base: str, output_name: str) -> str:
    return os.path.join(base, output_name + time.strftime("%Y%m%d%H%M%S"))


def trackers(log_with: str, logging_dir: str) -> tuple[str, ...]:
    """The logs a run writes: ("tensorboard",), ("wandb",), both, or none."""
    choice = (log_with or "").strip().lower()
    tensorboard = bool(logging_dir) and choice in ("", "tensorboard", "all")
    wandb = choice in ("wandb", "all")
    return tuple(name for name, on in zip(TRACKERS, (tensorboard, wandb)) if on)


def open_log(logging_dir: str, output_name: str, settings: Any = None):
    """The run's logs, in ``<logging_dir>/<output_name><time>`` (``output_name``: the log prefix or the output name).
    Without ``settings`` (an older caller): TensorBoard whenever ``logging_dir`` is set."""
    if settings is None:
        return TensorBoardLog(logging_dir, output_name) if logging_dir else NoLog()
    names = trackers(getattr(settings, "log_with", ""), settings.logging_dir)
    if not names:
        return NoLog()
    from trainer.wandb_log import WandbLog, log_base

    folder = run_folder(log_base(settings) if "wandb" in names else settings.logging_dir, output_name)
    loggers: list = []
    try:
        if "tensorboard" in names:
            loggers.append(TensorBoardLog(settings.logging_dir, output_name, folder))
        if "wandb" in names:
            loggers.append(WandbLog(settings, folder))
    except BaseException:
        RunLoggers(loggers).close()
        raise
    return loggers[0] if len(loggers) == 1 else RunLoggers(loggers)
