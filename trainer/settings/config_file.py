"""Read a JSON config file safely: every config JSON (GUI Load, presets, CLI ``--config``) comes through here.

Only a regular file is read (a FIFO would block a worker forever, ``/dev/zero`` never
ends), at most :data:`MAX_CONFIG_BYTES` (a kohya_ss config is a few KB), as UTF-8, with
a bounded nesting depth. Every refusal is a :class:`ConfigFileError` naming the file and
the fix; no library error escapes.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from trainer.problems import NekoyaError

MAX_CONFIG_BYTES = 1024 * 1024
MAX_NESTING = 32  # kohya_ss configs are flat; a few levels covers any list or table value
_NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a device"),
                (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


class ConfigFileError(NekoyaError, ValueError):
    """A config file that cannot be used; the message names the file and what to do."""


def read_config_json(path: str | os.PathLike) -> Any:
    """The parsed JSON of ``path``. Raises ConfigFileError."""
    name = repr(str(path))
    raw = _read_limited(Path(path), name)
    try:
        text = raw.decode("utf-8-sig")  # kohya_ss on Windows may have written a BOM
    except UnicodeDecodeError as err:
        raise ConfigFileError(
            f"config file {name} is not UTF-8 text (byte {err.start} cannot be decoded): "
            "save it as UTF-8 or pick a kohya_ss .json config") from None
    try:
        data = json.loads(text)
        too_deep = _depth_over(data, MAX_NESTING)
    except json.JSONDecodeError as err:
        raise ConfigFileError(f"config file {name} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
    except RecursionError:  # the json parser's own limit (about 1000 levels)
        too_deep = True
    if too_deep:
        raise ConfigFileError(
            f"config file {name} is nested more than {MAX_NESTING} levels deep: a kohya_ss config is a flat "
            "JSON object of settings; pick the config .json")
    return data


def _read_limited(path: Path, name: str) -> bytes:
    try:
        kind = _not_regular_kind(path.stat().st_mode)
        if kind:
            raise ConfigFileError(f"config file {name} is {kind}, not a file: pick a kohya_ss .json config file")
        # O_NONBLOCK: if the path was swapped for a FIFO after the check above, open must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ConfigFileError(f"config file {name} does not exist: check the path") from None
    except OSError as err:
        raise ConfigFileError(f"config file {name} cannot be read: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as f:
        kind = _not_regular_kind(os.fstat(f.fileno()).st_mode)
        if kind:
            raise ConfigFileError(f"config file {name} is {kind}, not a file: pick a kohya_ss .json config file")
        try:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as err:
            raise ConfigFileError(f"config file {name} cannot be read: {err.strerror or err}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigFileError(
            f"config file {name} is larger than {MAX_CONFIG_BYTES // 1024} KiB (a kohya_ss config is a few KB): "
            "pick the config .json, not another file")
    return raw


def _not_regular_kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _NOT_REGULAR if test(mode)), "not a regular file")


def _depth_over(data: Any, limit: int) -> bool:
    """Whether ``data`` nests deeper than ``limit`` (iterative: a deep value must not recurse here either)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False
