"""The family the check reasons about: the one read from the model's weights, else the settings' choice.

Every figure and capability comes from the family's record (``trainer.families``).
"""
from __future__ import annotations

from typing import Any

from trainer.families import FamilySpec, family_spec, spec_for_settings


def checked_family(settings: Any, detected: str | None) -> FamilySpec:
    """``detected`` (the checkpoint's family key) wins: the weights say what will be trained."""
    return family_spec(detected) if detected else spec_for_settings(settings)
