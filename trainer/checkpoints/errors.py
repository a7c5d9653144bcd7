"""Errors raised while reading users' checkpoints. Messages are meant for the user."""
from __future__ import annotations

from trainer.problems import NekoyaError


class CheckpointError(NekoyaError, ValueError):
    """The checkpoint cannot be used (wrong kind of file, missing parts, unreadable)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint needs arbitrary code to load; Nekoya refuses to run it."""
