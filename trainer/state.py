"""What a run knows about itself: loss averages, speed, memory, and the RNG states to resume from.

State folders (``--save_state``), and the ``Position`` they hold: :mod:`trainer.state_folder`.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch

from trainer.events import Memory
from trainer.state_folder import Position  # noqa: F401  (re-exported)


class ProgressMeter:
    """Loss averages (kohya's moving "avr_loss"), epoch mean, steps per second, ETA."""

    def __init__(self, total_steps: int, start_step: int = 0, window: int | None = None) -> None:
        self.total_steps = total_steps
        self.start_step = start_step
        self.started = time.perf_counter()
        self._window: deque[float] = deque(maxlen=window)
        self._epoch_losses: list[float] = []
        self._last = time.perf_counter()
        self._step_seconds: deque[float] = deque(maxlen=20)
        self.last_loss: float | None = None

    def new_epoch(self) -> None:
        self._epoch_losses = []

    def record(self, loss: float, excluded_s: float = 0.0) -> None:
        """A finished step. ``excluded_s``: time since the last step that was not training (latents encoded
        on first use), left out of the speed so the ETA is not inflated by work that ends with epoch 1."""
        self.last_loss = loss
        self._window.append(loss)
        self._epoch_losses.append(loss)
        now = time.perf_counter()
        self._step_seconds.append(max(0.0, now - self._last - excluded_s))
        self._last = now

    @property
    def avg_loss(self) -> float:
        return sum(self._window) / len(self._window) if self._window else 0.0

    @property
    def epoch_loss(self) -> float:
        return sum(self._epoch_losses) / len(self._epoch_losses) if self._epoch_losses else 0.0

    def exclude_pause(self, seconds: float) -> None:
        """A pause between two steps: left out of the next step's time (so of it/s and ETA) and of elapsed."""
        self._last += seconds
        self.started += seconds

    def it_per_s(self) -> float:
        seconds = sum(self._step_seconds)
        return len(self._step_seconds) / seconds if seconds > 0 else 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def eta(self, step: int, extra_s: float = 0.0) -> float:
        """Seconds left: the remaining steps at the current speed, plus ``extra_s`` of other known work."""
        speed = self.it_per_s()
        return ((self.total_steps - step) / speed if speed > 0 else 0.0) + extra_s


def memory_snapshot(device: torch.device) -> Memory:
    """Process RSS, plus the CUDA allocator figures on a GPU (MiB)."""
    import psutil

    rss = psutil.Process().memory_info().rss / 2**20
    if device.type != "cuda":
        return Memory(str(device), rss)
    mib = 2**20
    return Memory(
        f"cuda:{torch.cuda.current_device()}", rss, torch.cuda.memory_allocated() / mib,
        torch.cuda.memory_reserved() / mib, torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / mib,
        torch.cuda.max_memory_allocated() / mib,
    )


# -- RNG ---------------------------------------------------------------------------------------
# A run draws only from its own generators (never the process-wide RNGs another thread may use): the data
# and noise generator, and the network's dropout generator. The state folder keeps both states.
NETWORK_SEED_OFFSET = 1  # the dropout generator's seed is the run's seed + this (not the noise stream again)


def network_generator(seed: int) -> torch.Generator:
    """The run's dropout generator (CPU: it draws one seed per batch; the masks are made on the device)."""
    return torch.Generator().manual_seed(seed + NETWORK_SEED_OFFSET)


def rng_state(generator: torch.Generator, dropout_generator: torch.Generator) -> dict[str, Any]:
    return {
        "generator": generator.get_state(), "generator_device": str(generator.device),
        "network_generator": dropout_generator.get_state(), "network_generator_device": str(dropout_generator.device),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator, dropout_generator: torch.Generator,
                seed: int, step: int) -> str | None:
    """Put the saved generator states back; returns a note when the folder is older than the dropout
    generator (it held the global RNG states): that generator is then seeded from the seed and step."""
    generator.set_state(state["generator"])
    if "network_generator" in state:
        dropout_generator.set_state(state["network_generator"])
        return None
    dropout_generator.manual_seed(seed + NETWORK_SEED_OFFSET + step)
    return ("this state folder was saved by an older Nekoya (global random states): the resumed run goes on "
            "with the same data and noise, but its dropout randomness is not restored bit-exactly")
