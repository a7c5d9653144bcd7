"""kohya_ss's "Additional parameters": sd-scripts command-line flags, read as the settings they stand for.

Nekoya does not run sd-scripts, so a flag is applied by setting what it sets: ``--max_grad_norm=0`` is
``max_grad_norm`` 0, ``--network_train_unet_only`` a text-encoder learning rate of 0, ``--optimizer_args "a=1"
"b=2"`` the optimizer arguments. A flag with no Nekoya setting is refused by name (the check). Torch-free.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from .model import is_setting, setting_info

# sd-scripts flags whose setting has another name, or that set a fixed value
RENAMED = {"optimizer_type": "optimizer", "log_prefix": "log_prefix", "network_module": None}
FIXED = {"network_train_unet_only": {"text_encoder_lr": 0.0}, "network_train_text_encoder_only": {"unet_lr": 0.0}}
LIST_FLAGS = ("optimizer_args", "lr_scheduler_args")  # nargs="*": the words joined as Nekoya's text setting


@dataclass(frozen=True)
class Flag:
    name: str  # without the dashes
    words: tuple[str, ...]  # its values (none for a switch)

    @property
    def text(self) -> str:
        return f"--{self.name}" + (" " + " ".join(self.words) if self.words else "")


@dataclass(frozen=True)
class FlagReading:
    flag: Flag
    changes: dict[str, Any]  # setting -> raw value (validated by the check)
    problem: str = ""  # why the flag cannot be applied


def parse_flags(text: str) -> list[Flag]:
    """``--name value``, ``--name=value``, ``--switch`` and list flags, as argparse reads kohya_ss's command."""
    words = shlex.split(text.replace("\n", " "), posix=True)
    flags: list[Flag] = []
    for word in words:
        if word.startswith("--"):
            name, sep, value = word[2:].partition("=")
            flags.append(Flag(name.replace("-", "_"), (value,) if sep else ()))
        elif flags:
            flags[-1] = Flag(flags[-1].name, flags[-1].words + (word,))
        else:
            flags.append(Flag("", (word,)))  # text before any flag
    return flags


def read_flag(flag: Flag) -> FlagReading:
    """What the flag sets, or why it cannot be applied."""
    if not flag.name:
        return FlagReading(flag, {}, f"{' '.join(flag.words)!r} is not a --flag")
    if flag.name in FIXED:
        return FlagReading(flag, dict(FIXED[flag.name]))
    key = RENAMED.get(flag.name, flag.name)
    if key is None or not is_setting(key) or setting_info(key).unused:
        return FlagReading(flag, {}, f"--{flag.name} has no Nekoya setting: remove it (Nekoya does not run "
                                     "sd-scripts, so the flag would do nothing)")
    info = setting_info(key)
    if not flag.words:
        if info.type is bool:
            return FlagReading(flag, {key: True})
        return FlagReading(flag, {}, f"--{flag.name} needs a value")
    if key in LIST_FLAGS:
        return FlagReading(flag, {key: " ".join(flag.words)})
    if len(flag.words) > 1:
        return FlagReading(flag, {}, f"--{flag.name} takes one value, not {len(flag.words)}")
    return FlagReading(flag, {key: flag.words[0]})
