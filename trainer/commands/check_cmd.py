"""``python -m trainer check --config FILE``: print the preflight report; exit 0 if training can start, else 1."""
from __future__ import annotations

import sys
import time

EXIT_OK = 0
EXIT_CANNOT_START = 1


def run(settings, config_path: str | None = None, *, out=None) -> int:
    from trainer.preflight import check

    out = out or sys.stdout
    start = time.perf_counter()
    report = check(settings, deep=True)
    if config_path:
        out.write(f"Checked {config_path} in {time.perf_counter() - start:.1f} s\n")
    out.write(report.format())
    return EXIT_OK if report.ok else EXIT_CANNOT_START
