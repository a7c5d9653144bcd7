"""Model-family adapters (SD1, SD2 now; SDXL later), chosen by ``create_family(settings)``."""
from .registry import FAMILIES, create_family, family_key, register

__all__ = ["FAMILIES", "create_family", "family_key", "register"]
