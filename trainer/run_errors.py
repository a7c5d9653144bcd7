"""How a run's failure is told: the error a run raises itself, and any failure as the Problem its Error event carries."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from trainer.preflight.memory_advice import memory_advice
from trainer.problems import NekoyaError, Problem, problem_of
from trainer.safety import is_out_of_memory, nan_hint
from trainer.saving import NonFiniteWeights


class TrainingError(NekoyaError):
    """Training cannot start or go on; the message says why, ``field`` which setting and ``fix`` what to do."""

    def __init__(self, message: str, field: str | None = None, fix: str | None = None) -> None:
        super().__init__(message)
        self.field, self.fix = field, fix


# what gloo and NCCL raise in a process whose partner process ended
_LOST_PEER_TYPES = ("DistBackendError", "DistNetworkError", "DistStoreError")
_LOST_PEER_TEXT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "communicator was aborted")


def failure_problem(exc: Exception, settings: Any) -> Problem:
    """The failure as the Error event tells it; out of memory and NaN weights get advice for these settings."""
    if type(exc).__name__ in _LOST_PEER_TYPES or any(text in str(exc) for text in _LOST_PEER_TEXT):
        return Problem("error", None, "another process of the group stopped (its own message says why); this "
                       "process saved what the run had trained")
    if is_out_of_memory(exc):
        return Problem("error", "train_batch_size", "out of GPU memory", memory_advice(settings))
    problem = problem_of(exc)
    return replace(problem, fix=nan_hint(settings)) if isinstance(exc, NonFiniteWeights) else problem
