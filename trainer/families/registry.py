"""Model families by key: the one place that maps settings and checkpoints to a family.

Registering a ``FamilySpec`` is all a new family needs outside its own modules: the
check, the GUI's model pick, training, metadata and the tools look it up here. Where
two families share kohya's checkboxes or a checkpoint layout, the one registered
last wins, so a family can take over from a built-in one (an SD1 variant).
"""
from __future__ import annotations

from typing import Any, Mapping

from trainer.families.flux_spec import FLUX1
from trainer.families.sd3_spec import SD3
from trainer.families.spec import FamilySpec
from trainer.families.stable_diffusion import STABLE_DIFFUSION_SPECS

SPECS: dict[str, FamilySpec] = {}
# kohya_ss's model checkboxes, in the order the GUI's model pick sets them
FLAG_KEYS = ("v2", "v_parameterization", "sdxl", "flux1_checkbox", "sd3_checkbox")


def register_spec(spec: FamilySpec) -> FamilySpec:
    """Make a family known under ``spec.key`` (a later spec with the same key replaces it)."""
    SPECS.pop(spec.key, None)  # re-registering moves it last, so it wins lookups again
    SPECS[spec.key] = spec
    return spec


def unregister_spec(key: str) -> None:
    SPECS.pop(key, None)


def family_spec(key: str) -> FamilySpec:
    """The spec registered under ``key``; ValueError naming the known ones otherwise."""
    try:
        return SPECS[key]
    except KeyError:
        raise ValueError(f"unknown model family {key!r}; known: {', '.join(SPECS)}") from None


def spec_for_flags(flags: Mapping[str, Any]) -> FamilySpec:
    """The family kohya's checkboxes select (SDXL wins over v2, as in kohya_ss)."""
    for spec in reversed(SPECS.values()):
        if spec.selected_by(flags):
            return spec
    raise ValueError("no model family matches the v2 / SDXL / Flux.1 / SD3 checkboxes")


def spec_for_checkpoint(layout: str) -> FamilySpec:
    """The family that loads checkpoints of ``layout`` (the family ``trainer.checkpoints.detect`` reports)."""
    for spec in reversed(SPECS.values()):
        if spec.layout == layout:
            return spec
    raise ValueError(f"no model family loads {layout!r} checkpoints; known: {', '.join(SPECS)}")


def spec_for_lora_keys(names) -> FamilySpec | None:
    """The family whose own LoRA key prefixes (``FamilySpec.lora_key_markers``) the module names carry."""
    names = list(names)
    for spec in reversed(SPECS.values()):
        if spec.lora_key_markers and any(name.startswith(spec.lora_key_markers) for name in names):
            return spec
    return None


def spec_for_lora(sgm_names: bool, conditioning_width: int | None = None) -> FamilySpec | None:
    """The family a LoRA file was trained for: from SGM key names, else from its conditioning width."""
    for spec in reversed(SPECS.values()):
        if (spec.sgm_lora_names if sgm_names else spec.conditioning_width == conditioning_width):
            return spec
    return None


def spec_for_settings(settings: Any) -> FamilySpec:
    return spec_for_flags({name: getattr(settings, name) for name in FLAG_KEYS})


def family_key(settings: Any) -> str:
    """The registry key of the family the settings choose."""
    return spec_for_settings(settings).key


def create_family(settings: Any):
    """The adapter of the settings' family, its class imported only now."""
    spec = spec_for_settings(settings)
    return spec.adapter_class()(settings)


for _spec in (*STABLE_DIFFUSION_SPECS, FLUX1, SD3):
    register_spec(_spec)
