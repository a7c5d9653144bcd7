"""Check: every kohya_ss setting of the config that Nekoya does not apply, named with its value.

A kohya_ss config trains as kohya_ss would, or the check says by name what differs: one warning per
key of ``trainer.settings.kohya_unused`` (scope "sd") and per declared setting marked ``unused=``
whose value is not an off value. Keys of other model families and keys that change no run stay quiet, except
a family's keys Nekoya does not apply to that family yet while its checkbox is ticked (Flux.1's).
"""
from __future__ import annotations

import json
from typing import Any, Iterator

from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import SettingNotApplied
from trainer.settings import setting_infos
from trainer.settings.kohya_unused import OFF, SD, KohyaKey, kohya_key


@preflight_check("training.settings_not_applied")
def check_settings_not_applied(ctx: CheckContext) -> Iterator[SettingNotApplied]:
    s = ctx.settings
    values = {**s.kept_kohya_values(), **{k: getattr(s, k) for k in type(s).model_fields}}
    declared_unused = {info.key: info for info in setting_infos() if info.unused}
    for key, value in values.items():
        row = kohya_key(key)
        if row is None and key in declared_unused:  # a declared setting the table does not explain further
            info = declared_unused[key]
            row = KohyaKey(key, info.unused, off=(info.default, *OFF))
        applies = row is not None and (row.scope == SD or row.family_flag and bool(values.get(row.family_flag)))
        if applies and not row.is_off(value) and not row.is_moot(values):
            yield _warning(row, value)


def _warning(row: KohyaKey, value: Any) -> SettingNotApplied:
    message = f"{row.key} = {_shown(value)} is not applied: {row.instead}"
    fix = (f"{row.fix}; " if row.fix else "") + f"set {row.key} to {_shown(row.off[0])} to silence this warning"
    return SettingNotApplied("warning", row.key, message, fix=fix)


def _shown(value: Any) -> str:
    """A value as the config file writes it: true, 0, "text"."""
    return json.dumps(value, ensure_ascii=False, default=str)
