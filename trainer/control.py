"""Commands into a running training: the trainer polls them between steps.

The GUI (or a Ctrl+C handler) sets flags from another thread; the loop reads and
resets them at step boundaries, so nothing is interrupted half-way.
"""
from __future__ import annotations

import threading


class Control:
    def __init__(self) -> None:
        self._stop = threading.Event()
        self._sample = threading.Event()
        self._save = threading.Event()

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


def _take(flag: threading.Event) -> bool:
    if flag.is_set():
        flag.clear()
        return True
    return False
