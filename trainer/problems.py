"""What is wrong and what to do about it: the one ``Problem`` type and the one base of user-facing errors.

A ``Problem`` names the setting (``field``) or the file to blame, says what is wrong and how to fix it.
Settings validation, the preflight check, a run's ``Error`` event and the GUI carry it as data, so
nothing parses a field name back out of a message. A ``NekoyaError`` is an exception whose message
is meant for the user as it is; it turns into a Problem with ``problem()``.

Torch-free and free of other trainer imports at load time: every layer imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["error", "warning", "note"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "note")
_INDENT = " " * 9


@dataclass(frozen=True)
class Problem:
    """An error (training cannot start), a warning (it can, but you probably do not want it to) or a
    note (information, or an automatic adjustment that ``PreflightReport.adjusted`` applies for the run)."""

    severity: Severity
    field: str | None  # the setting to change, when one is to blame
    message: str
    fix: str = ""
    file: str | None = None
    # Settings this problem changes for the run, as (key, new value) pairs; see PreflightReport.adjusted.
    changes: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, not {self.severity!r}")

    def subject(self) -> str:
        """``train_data_dir (Image folder)``: the key and its GUI label, or the file, or "general"."""
        if self.field:
            return f"{self.field} ({_label(self.field)})"
        return self.file or "general"

    def format(self, severity_column: bool = False) -> str:
        """``subject: message`` with its file, fix and adjustments on indented lines. The CLI report puts the
        severity in a column before it; a run log says it through the log level (so never "warning: warning")."""
        head = f"{self.severity:<8} " if severity_column else ""
        indent = _INDENT if severity_column else "  "
        lines = [f"{head}{self.subject()}: {self.message}"]
        if self.file and self.field and self.file not in self.message:
            lines.append(f"{indent}file: {self.file}")
        if self.fix:
            lines.append(f"{indent}fix: {self.fix}")
        if self.changes:
            done = ", ".join(f"{key} = {value!r}" for key, value in self.changes)
            lines.append(f"{indent}adjusted for this run: {done}")
        return "\n".join(lines)


def _label(key: str) -> str:
    from trainer.settings import is_setting, setting_info  # imported late: the settings import this module

    return setting_info(key).label if is_setting(key) else key


class NekoyaError(Exception):
    """An error whose message is meant for the user: the GUI and the CLI show it as it is, without a traceback.

    ``field`` names the setting to change, ``fix`` what to do and ``file`` the file to blame, where known.
    Subclasses keep their own constructors and other bases (SaveError is an OSError too) and set these
    attributes when they know them.
    """

    field: str | None = None
    fix: str | None = None
    file: str | None = None

    def problem(self) -> Problem:
        return Problem("error", self.field, str(self), self.fix or "", self.file)


# Library errors whose message already says what is wrong in words a user follows.
_PLAIN_ERRORS = (FileNotFoundError, NotImplementedError)


def is_user_error(exc: BaseException) -> bool:
    """True when ``str(exc)`` is meant for the user; anything else is a bug, reported with its type and traceback."""
    return isinstance(exc, (NekoyaError, *_PLAIN_ERRORS))


def problem_of(exc: BaseException) -> Problem:
    """The error as a Problem; one that is not a user error keeps its type name in the message."""
    if isinstance(exc, NekoyaError):
        return exc.problem()
    message = str(exc) if is_user_error(exc) else f"{type(exc).__name__}: {exc}"
    return Problem("error", getattr(exc, "field", None), message)
