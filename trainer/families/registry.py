"""Model families by key. The one place that maps the settings' model flags to a family."""
from __future__ import annotations

from typing import Any, Callable

FAMILIES: dict[str, Callable[[Any], Any]] = {}


def register(key: str):
    """Class decorator: make a family adapter available under ``key``."""

    def add(cls):
        cls.key = key
        FAMILIES[key] = cls
        return cls

    return add


def family_key(settings: Any) -> str:
    """"sdxl", "sd2" or "sd1" from kohya's model checkboxes (v_parameterization is a family option)."""
    if settings.sdxl:
        return "sdxl"
    return "sd2" if settings.v2 else "sd1"


def create_family(settings: Any):
    from trainer.families import sd, sdxl  # noqa: F401  (importing registers the adapters)

    key = family_key(settings)
    if key not in FAMILIES:
        raise NotImplementedError(f"{key.upper()} training is not available yet; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[key](settings)
