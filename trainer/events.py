"""Typed progress events: the only way the trainer talks to the GUI and the CLI.

The trainer calls ``sink(event)`` for every event; it never prints progress itself.
Events are frozen dataclasses so a renderer can keep them without copying.
"""
from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Callable, Union

from trainer.problems import Problem


@dataclass(frozen=True)
class Memory:
    """Memory in MiB. On CUDA the allocator figures; on CPU only ``rss_mb``."""

    device: str  # "cuda:0", "cpu", ...
    rss_mb: float
    allocated_mb: float | None = None
    reserved_mb: float | None = None
    total_mb: float | None = None
    peak_allocated_mb: float | None = None


@dataclass(frozen=True)
class Started:
    total_steps: int
    total_epochs: int
    steps_per_epoch: int
    plan: str  # human-readable step plan, e.g. "150 images x 45 repeats x 1 epoch / batch 1 = 6750 steps"
    device: str
    start_step: int = 0  # > 0 when resuming


@dataclass(frozen=True)
class Step:
    step: int  # optimizer steps done, 1-based
    total_steps: int
    epoch: int  # 1-based
    total_epochs: int
    loss: float
    avg_loss: float  # moving average, as kohya's "avr_loss"
    lr: float  # first parameter group
    lrs: dict[str, float]  # every parameter group by name ("unet", "textencoder", ...)
    it_per_s: float
    elapsed_s: float
    eta_s: float
    memory: Memory
    ranks: tuple[Memory, ...] = ()  # a run of several processes: each one's memory (rank 0 first)


@dataclass(frozen=True)
class EpochEnd:
    epoch: int
    total_epochs: int
    avg_loss: float


@dataclass(frozen=True)
class Saved:
    path: str
    kind: str  # "epoch", "step", "final", "stopped", "state"
    step: int
    epoch: int


@dataclass(frozen=True)
class DiskFull:
    """A save failed for lack of disk space (the run then ends). The LoRA of ``step`` is kept in memory:
    ``Control.save_kept_to(path)`` (or ``TrainResult.kept.save_to``) writes it elsewhere later."""

    path: str  # the file that could not be written
    free_bytes: int | None  # free on the disk holding it
    step: int
    advice: str  # "The disk holding /x has 12 MiB free: free some space or choose another folder with Save to…"


@dataclass(frozen=True)
class Paused:
    """The run waits between two steps, model, optimizer and data kept; ``freed_memory``: its weights and
    optimizer state were moved to the CPU until it resumes. ``note`` says what the pause did."""

    step: int
    freed_memory: bool = False
    note: str = ""


@dataclass(frozen=True)
class Resumed:
    step: int
    paused_s: float  # left out of it/s and the ETA


@dataclass(frozen=True)
class Sample:
    path: str
    prompt: str
    step: int
    epoch: int


@dataclass(frozen=True)
class Log:
    message: str
    level: str = "info"  # "info" or "warning"


@dataclass(frozen=True)
class Error:
    """Training could not go on: a ``Problem``'s fields. ``field`` names the setting to fix when one is to
    blame, ``hint`` what to do, ``file`` the file to blame."""

    message: str
    field: str | None = None
    hint: str | None = None
    file: str | None = None

    @classmethod
    def of(cls, problem: Problem) -> "Error":
        return cls(problem.message, problem.field, problem.fix or None, problem.file)


@dataclass(frozen=True)
class Finished:
    step: int
    files: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Stopped:
    """Stopped on request between two steps; ``files`` holds what was saved."""

    step: int
    files: tuple[str, ...] = field(default_factory=tuple)


Event = Union[Started, Step, EpochEnd, Saved, DiskFull, Paused, Resumed, Sample, Log, Error, Finished, Stopped]
EventSink = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """A sink that drops everything (the default when nobody listens)."""


class QueueSink:
    """A sink that puts events on a queue; the GUI drains it from its own thread."""

    def __init__(self) -> None:
        self.queue: "queue.Queue[Event]" = queue.Queue()

    def __call__(self, event: Event) -> None:
        self.queue.put(event)

    def drain(self) -> list[Event]:
        events = []
        while True:
            try:
                events.append(self.queue.get_nowait())
            except queue.Empty:
                return events
