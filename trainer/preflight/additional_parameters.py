"""Check: kohya_ss's Additional parameters (sd-scripts flags). Each flag with a Nekoya setting is applied (a note
says so and the run plan takes the value); a flag without one is refused by name."""
from __future__ import annotations

from pydantic import ValidationError

from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem
from trainer.settings import TrainingSettings
from trainer.settings.sd_scripts_flags import parse_flags, read_flag

FIELD = "additional_parameters"


@preflight_check("training.additional_parameters")
def check_additional_parameters(ctx: CheckContext):
    s = ctx.settings
    text = (s.additional_parameters or "").strip()
    if not text:
        return
    try:
        flags = parse_flags(text)
    except ValueError as exc:  # an unclosed quote
        yield Problem("error", FIELD, f"the text cannot be read as command-line flags ({exc})",
                      fix="close the quote, or write each flag as --name=value")
        return
    for flag in flags:
        reading = read_flag(flag)
        if reading.problem:
            yield Problem("error", FIELD, reading.problem, fix=f"remove {flag.text} from {FIELD}")
            continue
        try:
            values = _validated(s, reading.changes)
        except ValidationError as exc:
            yield Problem("error", FIELD, f"{flag.text}: {exc.errors()[0]['msg']}",
                          fix=f"correct or remove {flag.text}")
            continue
        yield Problem("note", FIELD, f"{flag.text} is applied", changes=tuple(values.items()))


def _validated(settings: TrainingSettings, changes: dict) -> dict:
    """The flag's values as the settings model reads them (ValidationError when it does not take them)."""
    checked = TrainingSettings.model_validate({**settings.model_dump(), **changes})
    return {key: getattr(checked, key) for key in changes}
