"""What a run knows about itself: position, loss averages, speed, and the resume state.

A state folder (``--save_state``) holds the LoRA weights, the optimizer, scheduler
and grad-scaler state, every RNG the run draws from, and ``train_state.json`` with
the position (``current_step``, ``current_epoch`` as sd-scripts, plus the batch
within the epoch). ``train_state.json`` is written last: a folder without it is
not a usable state.
"""
from __future__ import annotations

import io
import json
import os
import random
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import torch

from trainer import saving
from trainer.events import Memory

STATE_FILE = "train_state.json"
WEIGHTS_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 1  # 1-based epoch in progress (or just finished)
    batches_done: int = 0  # batches of ``epoch`` already trained
    seed: int = 0


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
        torch.cuda.memory_reserved() / mib, torch.cuda.get_device_properties(0).total_memory / mib,
        torch.cuda.max_memory_allocated() / mib,
    )


# -- RNG ---------------------------------------------------------------------------------------
def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "generator": generator.get_state(),
        "generator_device": str(generator.device),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# -- state folders ------------------------------------------------------------------------------
def save_state(folder: str, lora_tensors: dict[str, torch.Tensor], stepper_state: dict, rng: dict,
               position: Position) -> None:
    """Write a resumable state folder; every file atomically, ``train_state.json`` last."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    saving.atomic_write(os.path.join(folder, WEIGHTS_FILE), lambda tmp: save_file(lora_tensors, tmp))
    saving.atomic_write_bytes(os.path.join(folder, OPTIMIZER_FILE), _torch_bytes(stepper_state))
    saving.atomic_write_bytes(os.path.join(folder, RNG_FILE), _torch_bytes(rng))
    info = {"current_step": position.step, "current_epoch": position.epoch, **asdict(position)}
    saving.atomic_write_bytes(os.path.join(folder, STATE_FILE), json.dumps(info, indent=2).encode())


@dataclass
class LoadedState:
    position: Position
    lora_tensors: dict[str, torch.Tensor]
    stepper_state: dict
    rng: dict


def load_state(folder: str) -> LoadedState:
    from safetensors.torch import load_file

    info_path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"{folder} is not a training state folder (no {STATE_FILE})")
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    position = Position(
        step=int(info["current_step"]),
        epoch=int(info.get("epoch", info.get("current_epoch", 1))),
        batches_done=int(info.get("batches_done", 0)),
        seed=int(info.get("seed", 0)),
    )
    return LoadedState(
        position=position,
        lora_tensors=load_file(os.path.join(folder, WEIGHTS_FILE)),
        stepper_state=torch.load(os.path.join(folder, OPTIMIZER_FILE), map_location="cpu", weights_only=True),
        rng=torch.load(os.path.join(folder, RNG_FILE), map_location="cpu", weights_only=True),
    )


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
