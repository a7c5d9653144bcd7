"""``TrainingSettings``: every setting of a LoRA run, the one source of truth.

Field names are kohya_ss's JSON keys. The declarations live in the ``tab_*``
modules; this module adds value-form coercion, choice checks and the rules that
relate two fields, so that a bad file reports all its problems at once.
"""
from __future__ import annotations

import re
from functools import lru_cache

from pydantic import ConfigDict, ValidationInfo, field_validator

from .coerce import coerce, parse_key_value_args
from .field import TABS, SettingInfo, info_from_field
from .tab_advanced import AdvancedSettings, SampleSettings
from .tab_flux import FluxSettings
from .tab_parameters import ParameterSettings
from .tab_sd3 import SD3Settings
from .tab_source_folders import FolderSettings, MetadataSettings, SourceModelSettings
from .tab_accelerate import AccelerateSettings  # noqa: I001  (declared last: its section ends the Parameters tab)

# Characters Windows, macOS or Linux refuse in a file name, and control characters.
_BAD_NAME_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
# A caption extension is appended to each image's stem: letters, digits, '-', '_' after dots ("txt" reads as ".txt").
_CAPTION_EXTENSION = re.compile(r"\.?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


class TrainingSettings(
    SampleSettings, SD3Settings, FluxSettings, AdvancedSettings, AccelerateSettings, ParameterSettings, MetadataSettings, FolderSettings, SourceModelSettings
):
    # extra="allow": kohya keys Nekoya does not use are kept and written back on save.
    model_config = ConfigDict(extra="allow", validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _read_kohya_value_forms(cls, value, info: ValidationInfo):
        field = cls.model_fields[info.field_name]
        if info.field_name == "max_resolution" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = f"{int(value)},{int(value)}"
        return coerce(value, field.annotation, field.default)

    @field_validator("*", mode="after")
    @classmethod
    def _check_choices(cls, value, info: ValidationInfo):
        meta = setting_info(info.field_name)
        if meta.choices is not None and not meta.allow_custom and value not in meta.choices:
            raise ValueError("not one of the choices; choose " + ", ".join(repr(c) for c in meta.choices))
        return value

    @field_validator("max_resolution")
    @classmethod
    def _check_resolution(cls, value: str) -> str:
        parts = [p.strip() for p in value.replace("x", ",").split(",")]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError("write it as width,height, e.g. 512,512")
        width, height = (int(p) for p in parts)
        if min(width, height) < 64:
            raise ValueError("width and height must be at least 64")
        return f"{width},{height}"

    @field_validator("optimizer_args", "lr_scheduler_args")
    @classmethod
    def _check_key_value_args(cls, value: str) -> str:
        parse_key_value_args(value)
        return value

    @field_validator("output_name")
    @classmethod
    def _check_output_name(cls, value: str) -> str:
        if value.strip() in ("", ".", ".."):
            raise ValueError("give a file name, e.g. my_lora")
        bad = sorted(set(_BAD_NAME_CHARS.findall(value)))
        if bad:
            shown = " ".join(repr(c) for c in bad)
            raise ValueError(f"a file name cannot contain {shown}; use letters, digits, '-' or '_'")
        return value

    @field_validator("caption_extension")
    @classmethod
    def _check_caption_extension(cls, value: str) -> str:
        if value.strip() and not _CAPTION_EXTENSION.fullmatch(value.strip()):
            raise ValueError("not a file extension; write one such as '.txt' or '.caption' (or leave it empty)")
        return value

    @field_validator("max_bucket_reso")
    @classmethod
    def _check_bucket_range(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_bucket_reso")
        if low is not None and value < low:
            raise ValueError(f"must be at least the Minimum bucket resolution ({low})")
        return value

    @field_validator("full_bf16")
    @classmethod
    def _check_full_precision(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("full_fp16"):
            raise ValueError("Full fp16 and Full bf16 cannot both be on; untick one")
        return value

    @field_validator("max_timestep")
    @classmethod
    def _check_timestep_range(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_timestep")
        if low is not None and value < low:
            raise ValueError(f"must be at least Min Timestep ({low})")
        return value

    # --- derived values (read by the trainer, the GUI and preflight alike) -----
    @property
    def resolution(self) -> tuple[int, int]:
        """(width, height) from max_resolution."""
        width, height = self.max_resolution.split(",")
        return int(width), int(height)

    def train_lrs(self) -> tuple[float, float]:
        """(unet_lr, text_encoder_lr) as kohya_ss passes them: 0 means "not trained";
        when both are 0 the single Learning rate is used for both."""
        if self.unet_lr == 0 and self.text_encoder_lr == 0:
            return self.learning_rate, self.learning_rate
        return self.unet_lr, self.text_encoder_lr

    def optimizer_kwargs(self) -> dict[str, str]:
        return parse_key_value_args(self.optimizer_args)

    def lr_scheduler_kwargs(self) -> dict[str, str]:
        return parse_key_value_args(self.lr_scheduler_args)

    def kept_kohya_values(self) -> dict:
        """Keys of the loaded file that Nekoya does not use (written back on save)."""
        return dict(self.__pydantic_extra__ or {})


@lru_cache(maxsize=None)
def _infos() -> dict[str, SettingInfo]:
    infos = [info_from_field(name, f) for name, f in TrainingSettings.model_fields.items()]
    return {i.key: i for i in sorted(infos, key=lambda i: (TABS.index(i.tab), i.order))}


def setting_infos() -> list[SettingInfo]:
    """Every setting in display order (tab by tab, as declared)."""
    return list(_infos().values())


def setting_info(key: str) -> SettingInfo:
    return _infos()[key]


def is_setting(key: str) -> bool:
    return key in TrainingSettings.model_fields
