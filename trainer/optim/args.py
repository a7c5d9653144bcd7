"""kohya's ``key=value`` argument strings, with values read as Python literals."""
from __future__ import annotations

import ast
from typing import Any

from trainer.problems import NekoyaError


class OptimConfigError(NekoyaError, ValueError):
    """An optimizer or scheduler setting cannot be used; ``field`` names the setting."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def parse_literal_args(text: str, field: str) -> dict[str, Any]:
    """``"betas=(0.9,0.99) weight_decay=0.01 decouple=True"`` -> kwargs, as sd-scripts
    does with ``ast.literal_eval``; a bare word that is not a literal stays a string. Double quotes are dropped
    first, as kohya_ss does (its presets write ``"d0=1e-5" "decouple=True"``); single quotes make a string."""
    kwargs: dict[str, Any] = {}
    for token in (text or "").replace('"', "").split():
        key, sep, raw = token.partition("=")
        if not sep or not key or not raw:
            raise OptimConfigError(f"{token!r} is not key=value (pairs separated by spaces, no spaces around '=')", field)
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            if not raw.replace("_", "").replace("-", "").isalnum():
                raise OptimConfigError(f"{key}={raw} is not a Python value (e.g. 0.01, True, (0.9,0.99))", field) from None
            kwargs[key] = raw
    return kwargs
