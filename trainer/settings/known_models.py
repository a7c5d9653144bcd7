"""The model quick-pick list (kohya_ss's names) and the family flags each one implies."""
from __future__ import annotations

CUSTOM = "custom"

# name -> (v2, v_parameterization, sdxl), as kohya_ss sets the hidden checkboxes.
QUICK_PICK: dict[str, tuple[bool, bool, bool]] = {
    "stabilityai/stable-diffusion-xl-base-1.0": (False, False, True),
    "stabilityai/stable-diffusion-xl-refiner-1.0": (False, False, True),
    "stabilityai/stable-diffusion-2-1-base/blob/main/v2-1_512-ema-pruned": (True, False, False),
    "stabilityai/stable-diffusion-2-1-base": (True, False, False),
    "stabilityai/stable-diffusion-2-base": (True, False, False),
    "stabilityai/stable-diffusion-2-1/blob/main/v2-1_768-ema-pruned": (True, True, False),
    "stabilityai/stable-diffusion-2-1": (True, True, False),
    "stabilityai/stable-diffusion-2": (True, True, False),
    "runwayml/stable-diffusion-v1-5": (False, False, False),
    "CompVis/stable-diffusion-v1-4": (False, False, False),
}

QUICK_PICK_CHOICES = (CUSTOM, *QUICK_PICK)


def family_flags(name: str) -> tuple[bool, bool, bool] | None:
    """(v2, v_parameterization, sdxl) for a quick-pick name, None for custom paths."""
    return QUICK_PICK.get(name)
