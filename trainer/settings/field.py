"""One declaration per setting: type, default, range, choices and GUI metadata.

Every setting of a run is declared once with :func:`setting`. The GUI builds its
widgets from :func:`setting_infos`, presets use the field name as the kohya_ss
JSON key, the CLI's ``--set`` and validation read the same declaration.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

from pydantic import Field
from pydantic_core import PydanticUndefined

TABS = ("Source Model", "Folders", "Parameters", "Advanced", "Samples", "Metadata")

# Widget kinds the GUI knows how to build.
WIDGETS = ("checkbox", "dropdown", "radio", "number", "slider", "text", "textarea", "path", "file", "folder")

_order = itertools.count()


def setting(
    default: Any,
    *,
    label: str,
    tab: str,
    help: str = "",
    section: str = "",
    ge: float | None = None,
    le: float | None = None,
    step: float | None = None,
    choices: Sequence[Any] | None = None,
    allow_custom: bool = False,
    widget: str | None = None,
    unit: str = "",
    visible_when: dict[str, Sequence[Any]] | None = None,
    unused: str = "",
    ss_key: str = "",
    ss_none_if_off: bool = False,
) -> Any:
    """Declare a setting. The field's name is its kohya_ss JSON key.

    ``visible_when={"LoRA_type": ("Kohya LoCon",)}``: the GUI shows the widget only while
    every named setting has one of the listed values (the value is kept either way).
    ``unused="why"``: a kohya_ss setting Nekoya reads and writes back but does not use; the GUI
    hides its widget and names it, with the reason, in a note on its tab.
    ``ss_key="ss_seed"``: the LoRA file's metadata records the value under this sd-scripts key;
    ``ss_none_if_off``: a value of 0 or "" is recorded as None, as sd-scripts does.
    """
    if tab not in TABS:
        raise ValueError(f"unknown tab {tab!r}")
    if widget is not None and widget not in WIDGETS:
        raise ValueError(f"unknown widget {widget!r}")
    extra = {
        "label": label,
        "tab": tab,
        "section": section,
        "order": next(_order),
        "choices": list(choices) if choices is not None else None,
        "allow_custom": allow_custom,
        "widget": widget,
        "step": step,
        "unit": unit,
        "visible_when": {k: list(v) for k, v in (visible_when or {}).items()},
        "unused": unused,
        "ss_key": ss_key,
        "ss_none_if_off": ss_none_if_off,
    }
    return Field(default, ge=ge, le=le, description=help, json_schema_extra=extra)


def option(
    default: Any,
    *,
    label: str,
    help: str = "",
    ge: float | None = None,
    le: float | None = None,
    step: float | None = None,
    choices: Sequence[Any] | None = None,
    widget: str | None = None,
    cli: str = "",
) -> Any:
    """Declare one option of a tool's request model (``trainer/tools/requests.py``), as :func:`setting`
    declares a setting: the GUI builds its widget and the ``lora`` CLI its argparse option from it.
    ``cli``: the command-line flags when not ``--name-with-dashes`` (``"-o --out"``); without a dash,
    a positional argument. ``default=...``: no default, the command line requires it.
    """
    if widget is not None and widget not in WIDGETS:
        raise ValueError(f"unknown widget {widget!r}")
    extra = {
        "label": label, "tab": "", "order": next(_order), "choices": list(choices) if choices is not None else None,
        "widget": widget, "step": step, "cli": cli,
    }
    return Field(default, ge=ge, le=le, description=help, json_schema_extra=extra)


def request_infos(model) -> dict[str, "SettingInfo"]:
    """The options of a request model declared with :func:`option`, by name, in declared order."""
    return {name: info_from_field(name, field) for name, field in model.model_fields.items()}


@dataclass(frozen=True)
class SettingInfo:
    """Everything about one setting, read from its declaration."""

    key: str
    label: str
    help: str
    tab: str
    section: str
    order: int
    default: Any
    type: type
    choices: tuple | None
    allow_custom: bool
    widget: str
    ge: float | None
    le: float | None
    step: float | None
    unit: str
    visible_when: tuple[tuple[str, tuple], ...] = ()
    unused: str = ""  # why Nekoya does not use it (kept in the JSON only); empty for a used setting
    ss_key: str = ""  # the LoRA metadata key recording its value; empty when none does (or one is computed)
    ss_none_if_off: bool = False  # 0 or "" recorded as None
    cli: str = ""  # a tool option's command-line flag when it is not --name-with-dashes

    @property
    def required(self) -> bool:
        """A tool option declared without a default (a path the command line must be given)."""
        return self.default is PydanticUndefined

    def is_visible(self, values: dict[str, Any]) -> bool:
        """Whether the GUI shows this setting, given the current values of the others."""
        return not self.unused and all(values.get(key) in allowed for key, allowed in self.visible_when)

    def describe_allowed(self) -> str:
        """What values are allowed, in words, for error messages."""
        if self.choices is not None and not self.allow_custom:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.type is bool:
            return "true or false"
        if self.ge is not None and self.le is not None:
            return f"a number from {_fmt(self.ge)} to {_fmt(self.le)}"
        if self.ge is not None:
            return f"a number of at least {_fmt(self.ge)}"
        if self.le is not None:
            return f"a number of at most {_fmt(self.le)}"
        return {int: "a whole number", float: "a number", str: "text"}.get(self.type, self.type.__name__)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def info_from_field(name: str, field) -> SettingInfo:
    extra = field.json_schema_extra or {}
    ge = le = None
    for meta in field.metadata:
        ge = getattr(meta, "ge", ge)
        le = getattr(meta, "le", le)
    typ = field.annotation
    choices = tuple(extra["choices"]) if extra.get("choices") is not None else None
    return SettingInfo(
        key=name,
        label=extra["label"],
        help=field.description or "",
        tab=extra["tab"],
        section=extra.get("section", ""),
        order=extra["order"],
        default=field.default,
        type=typ,
        choices=choices,
        allow_custom=extra.get("allow_custom", False),
        widget=extra.get("widget") or _default_widget(typ, choices),
        ge=ge,
        le=le,
        step=extra.get("step"),
        unit=extra.get("unit", ""),
        visible_when=tuple((k, tuple(v)) for k, v in extra.get("visible_when", {}).items()),
        unused=extra.get("unused", ""),
        ss_key=extra.get("ss_key", ""),
        ss_none_if_off=extra.get("ss_none_if_off", False),
        cli=extra.get("cli", ""),
    )


def _default_widget(typ: type, choices: tuple | None) -> str:
    if typ is bool:
        return "checkbox"
    if choices is not None:
        return "dropdown"
    if typ in (int, float):
        return "number"
    return "text"
