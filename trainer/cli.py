"""Command line: ``python -m trainer {config,check,train,extend,queue,lora} ...``.

All three read the same kohya_ss-format JSON file and the same ``--set KEY=VALUE``
overrides through ``trainer.settings``; ``train`` runs the same entry point as the GUI.
"""
from __future__ import annotations

import argparse
import sys

from .model_libraries import stay_offline
from .settings import SettingsError, apply_overrides, read_settings_file, settings_to_json

EXIT_INVALID_SETTINGS = 2
EXIT_CANNOT_START = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Nekoya LoRA trainer (headless).")
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", help="print the normalized settings of a config file as JSON")
    config.add_argument("file", help="kohya_ss / Nekoya JSON config or preset")
    _add_overrides(config)
    check = sub.add_parser("check", help="preflight check: report every problem before any model is loaded")
    check.add_argument("--config", required=True, help="kohya_ss / Nekoya JSON config")
    _add_overrides(check)
    train = sub.add_parser("train", help="train a LoRA in this process, with a progress bar")
    train.add_argument("--config", required=True, help="kohya_ss / Nekoya JSON config")
    _add_overrides(train)
    from .commands import extend_cmd, lora_cmd, queue_cmd  # light: heavy imports happen inside their commands

    extend_cmd.add_parser(sub)
    queue_cmd.add_parser(sub)
    lora_cmd.add_parser(sub)
    return parser


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (kohya_ss key), may be repeated")


def load(path: str, overrides: list[str]):
    report = read_settings_file(path)
    for line in report.warnings():
        print(f"warning: {line}", file=sys.stderr)
    settings = apply_overrides(report.settings, overrides) if overrides else report.settings
    return settings


def main(argv: list[str] | None = None) -> int:
    stay_offline()  # before anything imports huggingface_hub or bitsandbytes
    args = build_parser().parse_args(argv)
    if args.command == "lora":
        from .commands import lora_cmd

        return lora_cmd.run(args)
    if args.command == "extend":
        from .commands import extend_cmd

        return extend_cmd.run(args)
    if args.command == "queue":
        from .commands import queue_cmd

        return queue_cmd.run(args)
    file = args.file if args.command == "config" else args.config
    try:
        settings = load(file, args.overrides)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CANNOT_START if args.command == "check" else EXIT_INVALID_SETTINGS
    if args.command == "config":
        sys.stdout.write(settings_to_json(settings))
        return 0
    if args.command == "check":
        from .commands import check_cmd

        return check_cmd.run(settings, config_path=file)
    from .commands import train_cmd

    return train_cmd.run(settings)
