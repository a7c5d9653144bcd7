"""Sample prompts in sd-scripts' syntax: one prompt a line, options after `` --``.

``a photo of sks dog --n blurry --w 768 --h 512 --d 42 --l 7 --s 28 --ss euler_a``

The value of ``sample_prompts`` is either that text itself or the path of a
``.txt``, ``.json`` or ``.toml`` prompt file as sd-scripts reads them. Defaults
and rules are sd-scripts': 512x512 rounded down to a multiple of 8 (at least 64),
30 steps clamped to 1..1000, CFG 7.5, no seed (random), the run's sampler.
No heavy imports here: the GUI and preflight may parse prompts cheaply.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_SIZE = 512
DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
MIN_SIZE = 64
MAX_STEPS = 1000
PROMPT_FILE_SUFFIXES = (".txt", ".json", ".toml")


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    seed: int | None = None  # None: a random seed each time
    scale: float = DEFAULT_SCALE  # classifier-free guidance
    steps: int = DEFAULT_STEPS
    sampler: str | None = None  # None: the run's sample_sampler
    index: int = 0  # position in the prompt list (the ``_00`` of the file name)
    guidance: float | None = None  # ``--g``: a guidance-distilled model's embedded guidance (FLUX.1 dev; 3.5 if None)

    def normalized(self) -> "SamplePrompt":
        """Sizes and steps brought into sd-scripts' ranges."""
        return replace(self, width=round_size(self.width), height=round_size(self.height),
                       steps=max(1, min(MAX_STEPS, int(self.steps))))


def round_size(value: int) -> int:
    """Down to a multiple of 8, at least 64 (sd-scripts' rule)."""
    value = int(value)
    return max(MIN_SIZE, value - value % 8)


# option regex (matched at the start of each `` --`` part, case-insensitive) -> (field, converter)
_OPTIONS: tuple[tuple[re.Pattern, str, type], ...] = (
    (re.compile(r"w (\d+)", re.I), "width", int),
    (re.compile(r"h (\d+)", re.I), "height", int),
    (re.compile(r"d (\d+)", re.I), "seed", int),
    (re.compile(r"s (\d+)", re.I), "steps", int),
    (re.compile(r"l ([\d.]+)", re.I), "scale", float),
    (re.compile(r"g ([\d.]+)", re.I), "guidance", float),
    (re.compile(r"n (.+)", re.I), "negative_prompt", str),
    (re.compile(r"ss (.+)", re.I), "sampler", str),
)


def parse_prompt_line(line: str, index: int = 0) -> SamplePrompt:
    """One prompt line; unknown options (``--cn``...) and malformed values are ignored, as sd-scripts does."""
    prompt, *options = line.strip().split(" --")
    values: dict = {}
    for option in options:
        for pattern, name, convert in _OPTIONS:
            match = pattern.match(option)
            if match:
                try:
                    values[name] = convert(match.group(1).strip())
                except ValueError:  # e.g. "--l 7..5"
                    pass
                break
    return SamplePrompt(prompt.strip(), index=index, **values).normalized()


def parse_prompt_text(text: str) -> list[SamplePrompt]:
    """Every prompt of a text: empty lines and ``#`` comment lines skipped."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    return [parse_prompt_line(line, index) for index, line in enumerate(lines)]


# keys of a prompt dict in sd-scripts' .json/.toml files -> SamplePrompt field
_DICT_KEYS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
    "seed": "seed", "scale": "scale", "sample_steps": "steps", "sample_sampler": "sampler", "guidance_scale": "guidance",
}


def prompt_from_dict(values: dict, index: int = 0) -> SamplePrompt:
    known = {_DICT_KEYS[k]: v for k, v in values.items() if k in _DICT_KEYS and v is not None}
    return SamplePrompt(**{"prompt": "", **known, "index": index}).normalized()


def parse_sample_prompts(value: str) -> list[SamplePrompt]:
    """Prompts from the ``sample_prompts`` setting: the text itself, or a prompt file's path."""
    path = _prompt_file(value)
    if path is None:
        return parse_prompt_text(value or "")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".txt":
        return parse_prompt_text(text)
    if path.suffix.lower() == ".json":
        entries = json.loads(text)
    else:
        import tomllib

        data = tomllib.loads(text)["prompt"]
        shared = {k: v for k, v in data.items() if k != "subset"}
        entries = [{**shared, **subset} for subset in data.get("subset", [])]
    return [parse_prompt_line(e, i) if isinstance(e, str) else prompt_from_dict(e, i) for i, e in enumerate(entries)]


def _prompt_file(value: str) -> Path | None:
    """The prompt file ``value`` names, when it is one line naming an existing file."""
    text = (value or "").strip()
    if not text or "\n" in text or not text.lower().endswith(PROMPT_FILE_SUFFIXES):
        return None
    path = Path(os.path.expanduser(text))
    return path if path.is_file() else None
