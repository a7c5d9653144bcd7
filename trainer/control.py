"""Commands into a running training: the trainer polls them between steps.

The GUI (or a Ctrl+C handler) sets flags from another thread; the loop reads and
resets them at step boundaries, so nothing is interrupted half-way. After a run
that a full disk ended, ``save_kept_to`` writes the LoRA it kept in memory.
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.saving import KeptWeights


class Control:
    def __init__(self) -> None:
        self._stop = threading.Event()
        self._sample = threading.Event()
        self._save = threading.Event()
        self.kept_weights: KeptWeights | None = None  # set by the trainer when it could not write them

    # -- from the UI thread -------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def request_sample(self) -> None:
        self._sample.set()

    def request_save(self) -> None:
        self._save.set()

    # -- from the training thread -------------------------------------------
    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

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
