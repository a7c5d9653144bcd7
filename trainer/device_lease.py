"""One owner per device (a GPU, or the CPU) at a time: a training run, or one image job (Try it, regularisation images).

A run fills its device's memory (on the CPU, its cores); a second model loaded beside it runs out of
memory or slows both to a crawl. So a run holds its device's lease from setup to its end, and an image
job asking for that device is refused with a message saying why. A run that finds an image job holding
the device waits for it (a job takes seconds to minutes) and says so in its log.

The lease also owns what is process-wide about using the CPU: the torch thread count a CPU run asks for
(kohya's ``num_cpu_threads_per_process``) holds while the run holds the CPU, and is put back after.
Leases are re-entrant on one thread (the regularisation images hold one around each image's Try it call).
Devices are named as torch prints them ("cuda:0", "cpu"); this module imports torch only to set threads.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from trainer.problems import NekoyaError
from trainer.process_setup import apply_process_settings

TRAINING = "a training run"
TRY_IT = "Try it"
REG_IMAGES = "the regularisation images"


class DeviceBusy(NekoyaError, RuntimeError):
    """The device is leased to someone else: ``holder`` says who."""

    def __init__(self, holder: str, device: str) -> None:
        self.holder, self.device = holder, device
        super().__init__(f"{holder} is using the {device_label(device)}; wait for it or stop it")
        self.fix = "wait for the training run to end, or press Stop" if holder == TRAINING else "wait for it to end"


def device_name(device: Any) -> str:
    """The lease's name for a device: ``torch.device("cuda")`` and "cuda" are "cuda:0"."""
    name = str(device).lower()
    return f"{name}:0" if ":" not in name and name != "cpu" else name


def device_label(device: str) -> str:
    """How a message names the device: "GPU", "GPU cuda:1", "CPU"."""
    if device == "cpu":
        return "CPU"
    return "GPU" if device.endswith(":0") else f"GPU {device}"


@dataclass
class _Hold:
    holder: str
    thread: int
    depth: int = 1
    threads_before: int = 0  # torch's thread count to put back on release (0: not changed)


class Lease:
    """A held device; ``release()`` (or leaving the ``with`` block) hands it back. Releasing twice is harmless."""

    def __init__(self, leases: "DeviceLeases", device: str) -> None:
        self._leases, self.device, self._held = leases, device, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._leases._release(self.device)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DeviceLeases:
    """The process's leases, one per device name."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._holds: dict[str, _Hold] = {}

    def holder(self, device: Any) -> str | None:
        """Who holds the device now (None: nobody)."""
        with self._changed:
            hold = self._holds.get(device_name(device))
            return hold.holder if hold else None

    def take(self, device: Any, holder: str, *, wait_log: Callable[[str], None] | None = None,
             cpu_threads: int = 0) -> Lease:
        """Lease ``device`` to ``holder``. Without ``wait_log``, raise DeviceBusy when another thread holds it;
        with it, say once through ``wait_log`` who holds it and wait. ``cpu_threads``: torch's thread count
        while the CPU is held (0: leave it)."""
        apply_process_settings()  # the first lease in the process, before anything runs on a device
        name = device_name(device)
        me = threading.get_ident()
        with self._changed:
            told = False
            while (hold := self._holds.get(name)) is not None and hold.thread != me:
                if wait_log is None:
                    raise DeviceBusy(hold.holder, name)
                if not told:
                    wait_log(f"waiting for {hold.holder} to finish with the {device_label(name)}")
                    told = True
                self._changed.wait()
            if hold is not None:
                hold.depth += 1
            else:
                self._holds[name] = _Hold(holder, me, threads_before=_set_threads(cpu_threads) if name == "cpu" else 0)
        return Lease(self, name)

    def _release(self, name: str) -> None:
        with self._changed:
            hold = self._holds[name]
            hold.depth -= 1
            if hold.depth == 0:
                del self._holds[name]
                if hold.threads_before:
                    _set_threads(hold.threads_before)
                self._changed.notify_all()


def _set_threads(count: int) -> int:
    """Set torch's CPU thread count (what accelerate's --num_cpu_threads_per_process does); the count before."""
    if not count:
        return 0
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(count))
    return before


LEASES = DeviceLeases()  # the one owner of the process's devices
take = LEASES.take
holder = LEASES.holder
