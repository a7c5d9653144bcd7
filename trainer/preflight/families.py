"""The family the check reasons about: the one read from the model's weights, else the settings' choice.

Every figure and capability comes from the family's record (``trainer.families``).
"""
from __future__ import annotations

from typing import Any

from trainer.families import FamilySpec, spec_for_checkpoint, spec_for_settings


def checked_family(settings: Any, detected: str | None) -> FamilySpec:
    """The family loading ``detected`` checkpoints (the model's layout) wins: the weights say what is trained."""
    return spec_for_checkpoint(detected) if detected else spec_for_settings(settings)
