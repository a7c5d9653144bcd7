"""Model families: torch-free ``FamilySpec`` records by key, and the adapters they load lazily."""
from .registry import (FLAG_KEYS, SPECS, create_family, family_key, family_spec, register_spec, spec_for_checkpoint,
                       spec_for_flags, spec_for_lora, spec_for_lora_keys, spec_for_settings, unregister_spec)
from .spec import DiffusionSchedule, FamilySpec

__all__ = ["FLAG_KEYS", "SPECS", "DiffusionSchedule", "FamilySpec", "create_family", "family_key", "family_spec",
           "register_spec", "spec_for_checkpoint", "spec_for_flags", "spec_for_lora", "spec_for_lora_keys", "spec_for_settings",
           "unregister_spec"]
