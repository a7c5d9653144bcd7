"""kohya_ss value forms -> Python values.

kohya_ss configs store numbers as strings ("1e-4", "0"), use "" for "unset"
and, in old versions, booleans as "True"/"False". Anything that cannot be read
is returned unchanged so validation reports it with the field's name.
"""
from __future__ import annotations

from typing import Any

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(value: Any, target: type, default: Any) -> Any:
    if value is None:
        return default
    reader = _READERS.get(target)
    return reader(value, default) if reader else value


def _to_bool(value: Any, default: Any) -> Any:
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "":
            return default
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    return value


def _to_int(value: Any, default: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return default
        number = _parse_number(text)
        if number is None:
            return value
        value = number
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _to_float(value: Any, default: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return default
        number = _parse_number(text)
        return value if number is None else float(number)
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _to_str(value: Any, default: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    return value


def _parse_number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


_READERS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def parse_key_value_args(text: str) -> dict[str, str]:
    """Parse kohya's "key=value key2=value2" argument strings; raises ValueError on a bad token."""
    pairs: dict[str, str] = {}
    for token in text.split():
        key, sep, val = token.partition("=")
        if not sep or not key or not val:
            raise ValueError(f"{token!r} is not key=value (write pairs separated by spaces, no spaces around '=')")
        pairs[key] = val
    return pairs
