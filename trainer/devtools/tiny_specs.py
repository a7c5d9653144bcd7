"""The tiny random test models by name: each registered family's ``FamilySpec.tiny`` under its key, and its
``tiny_variants`` under theirs (the architectures are declared in :mod:`trainer.families.tiny_models`)."""
from __future__ import annotations

from trainer.families import SPECS
from trainer.families.tiny_models import TINY_VAE, TinySpec

__all__ = ["TINY_SPECS", "TINY_VAE", "TinySpec", "tiny_spec", "tiny_specs"]


def tiny_specs() -> dict[str, TinySpec]:
    """Every tiny model the registered families declare, by name (read now, so later registrations count)."""
    found: dict[str, TinySpec] = {}
    for spec in SPECS.values():
        if spec.tiny is not None:
            found[spec.key] = spec.tiny
        found.update(spec.tiny_variants)
    return found


def tiny_spec(name: str) -> TinySpec:
    """The tiny model called ``name``; ValueError naming the known ones otherwise."""
    known = tiny_specs()
    if name not in known:
        raise ValueError(f"unknown family {name!r}; expected one of {tuple(known)}")
    return known[name]


TINY_SPECS = tiny_specs()  # the built-in families' tiny models
