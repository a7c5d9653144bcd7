"""Commands into a running training: the trainer polls them between steps.

The GUI (or a Ctrl+C handler) sets flags from another thread; the loop reads and
resets them at step boundaries, so nothing is interrupted half-way. A pause holds
the training thread inside ``between_steps`` (model, optimizer and data stay loaded)
until Resume or Stop. After a run that a full disk ended, ``save_kept_to`` writes
the LoRA it kept in memory.
"""
from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from trainer import events as ev

if TYPE_CHECKING:
    from trainer.saving import KeptWeights

KEEP, FREE = "keep", "free"  # the two pauses: keep the weights where they are, or move them to the CPU
SAVE = "save"  # a paused run's wake-up for Save now: its LoRA is written (Try it can then load it)


class PausableRun(Protocol):
    """What a pause needs of the run (``trainer.loop._Run``)."""

    sink: ev.EventSink
    step: int
    meter: Any  # trainer.state.ProgressMeter
    device: Any
    family: Any
    network: Any
    stepper: Any  # its ``optimizer`` holds the state that a pause with free memory moves
    outputs: Any  # trainer.saving.RunOutputs: Save now while paused writes the step's LoRA
    epoch: int


class Control:
    def __init__(self) -> None:
        self._stop = threading.Event()
        self._sample = threading.Event()
        self._save = threading.Event()
        self._changed = threading.Condition()  # wakes a paused run on Resume, Stop or a switch to FREE
        self._pause: str | None = None  # KEEP or FREE while a pause is asked for
        self.kept_weights: KeptWeights | None = None  # set by the trainer when it could not write them
        self.rank_memory: tuple[ev.Memory, ...] = ()  # a group's processes' memory (trainer.distributed.sync)

    # -- from the UI thread -------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()
        self._notify()

    def request_pause(self, free_memory: bool = False) -> None:
        """Pause at the next step boundary; ``free_memory`` moves the weights to the CPU meanwhile (asked
        while already paused, it frees them then)."""
        with self._changed:
            self._pause = FREE if free_memory else KEEP
            self._changed.notify_all()

    def request_resume(self) -> None:
        with self._changed:
            self._pause = None
            self._changed.notify_all()

    @property
    def pause_requested(self) -> bool:
        return self._pause is not None

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def request_sample(self) -> None:
        self._sample.set()

    def request_save(self) -> None:
        self._save.set()
        self._notify()  # a paused run saves at once

    # -- from the training thread -------------------------------------------
    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def between_steps(self, run: PausableRun) -> bool:
        """At a step boundary: wait here while a pause is asked for; True when the run is to stop."""
        if self._pause is not None and not self.stop_requested:
            self._hold(run)
        return self.stop_requested

    def _hold(self, run: PausableRun) -> None:
        started, offloaded = time.perf_counter(), None  # offloaded: None until freed, False if nothing moved
        if self._pause == KEEP:
            run.sink(ev.Paused(run.step, note="model, optimizer and data stay loaded"))
        try:
            while (wake := self._wait_while_paused(offloaded is not None)) in (FREE, SAVE):
                if wake == SAVE and _take(self._save):
                    run.outputs.save("step", run.step, run.epoch)
                elif wake == FREE:
                    offloaded = self._free_memory(run)
        finally:
            if offloaded:
                offloaded.restore()
        paused = time.perf_counter() - started
        run.meter.exclude_pause(paused)
        run.sink(ev.Resumed(run.step, paused))

    def _wait_while_paused(self, freed: bool) -> str | None:
        """Block until there is something to do: SAVE (Save now), FREE (free memory now) or None (resume or
        stop)."""
        with self._changed:
            while (not self._stop.is_set() and not self._save.is_set()
                   and (self._pause == KEEP or (self._pause == FREE and freed))):
                self._changed.wait()
            if self._stop.is_set():
                return None
            return SAVE if self._save.is_set() else self._pause

    def _free_memory(self, run: PausableRun) -> Any:
        """Move the weights to the CPU and say so; returns what to restore (False: nothing moved)."""
        from trainer.offload import offload, run_modules  # torch: only once a run frees memory

        moved, note = offload(run.device, run_modules(run.family, run.network), run.stepper.optimizer)
        run.sink(ev.Paused(run.step, freed_memory=moved is not None, note=note))
        return moved or False

    def take_sample_request(self) -> bool:
        return _take(self._sample)

    def take_save_request(self) -> bool:
        return _take(self._save)

    def keep(self, weights: KeptWeights) -> None:
        self.kept_weights = weights

    # -- after the run ------------------------------------------------------
    def save_kept_to(self, path: str | os.PathLike) -> str:
        """Write the LoRA kept in memory to ``path`` (a file, or a folder to hold it under its run's
        name); returns the file written. Raises LookupError when nothing is kept, SaveError when
        this save fails too (the weights stay kept, so another path can be tried)."""
        if self.kept_weights is None:
            raise LookupError("no trained weights are kept in memory")
        return self.kept_weights.save_to(path)


def _take(flag: threading.Event) -> bool:
    if flag.is_set():
        flag.clear()
        return True
    return False
