"""``python -m trainer extend STATE_DIR --steps N | --epochs N [--config CONFIG]``: train a finished or stopped
run further (``trainer.extend``), with the same progress bar and exit codes as ``train``.

STATE_DIR is the run's state folder, or its LoRA file when it saved no state (then the optimizer starts
fresh). The settings default to the newest ``<output_name>_<time>.json`` the run wrote beside it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

EXIT_INVALID = 2


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("extend", help="train a finished or stopped run N more steps or epochs")
    p.add_argument("state_dir", metavar="STATE_DIR",
                   help="the run's <name>-state folder (or its LoRA file, when it saved no state)")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--steps", type=int, help="train this many more steps")
    amount.add_argument("--epochs", type=int, help="train this many more epochs")
    p.add_argument("--config", help="the run's settings (default: the newest <output_name>_<time>.json beside it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (kohya_ss key), may be repeated")
    return p


def run(args, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from trainer.cli import load
    from trainer.extend import ExtendError, extend_run, find_run_config, keep_previous_final, run_name
    from trainer.settings import SettingsError

    from . import train_cmd

    out, err = out or sys.stdout, err or sys.stderr
    source = os.path.normpath(os.path.expanduser(args.state_dir))
    config = args.config or find_run_config(os.path.dirname(os.path.abspath(source)), run_name(source))
    if config is None:
        print(f"error: no {run_name(source)}_<time>.json beside {source}: pass the run's settings with --config",
              file=err)
        return EXIT_INVALID
    try:
        settings = load(config, args.overrides)
        extension = extend_run(settings, source, steps=args.steps or 0, epochs=args.epochs or 0)
    except (SettingsError, ExtendError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_INVALID
    print(f"settings: {config}" + ("" if args.config else " (the newest the run wrote)"), file=out)
    kept = keep_previous_final(extension.settings, extension)
    for note in (*extension.notes, *([kept] if kept else [])):
        print(note, file=out)
    return train_cmd.run(extension.settings, out, err)
