"""The settings of a LoRA run: one pydantic model, kohya_ss JSON in and out.

Import from here: ``from trainer.settings import TrainingSettings, read_settings_file``.
"""
from .field import TABS, SettingInfo
from .kohya_json import (
    LoadReport,
    SettingsError,
    apply_overrides,
    read_settings_file,
    save_settings,
    settings_from_dict,
    settings_to_dict,
    settings_to_json,
)
from .known_models import CUSTOM, QUICK_PICK, QUICK_PICK_CHOICES, family_flags
from .model import TrainingSettings, is_setting, setting_info, setting_infos

__all__ = [
    "TABS", "SettingInfo", "LoadReport", "SettingsError", "apply_overrides", "read_settings_file",
    "save_settings", "settings_from_dict", "settings_to_dict", "settings_to_json", "CUSTOM", "QUICK_PICK",
    "QUICK_PICK_CHOICES", "family_flags", "TrainingSettings", "is_setting", "setting_info", "setting_infos",
]
