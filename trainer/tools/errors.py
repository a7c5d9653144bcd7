"""Errors of the LoRA tools. Messages are meant for the user (CLI and GUI show them as they are)."""
from __future__ import annotations

from pathlib import Path

from trainer.problems import NekoyaError


class ToolError(NekoyaError, ValueError):
    """A tool cannot do what was asked (bad input file, wrong base model, output in the way)."""


def check_output_path(out_path, suffixes: tuple[str, ...], inputs=(), overwrite: bool = False) -> Path:
    """The output path, refused when it has the wrong suffix, is an input, or exists (unless ``overwrite``)."""
    out = Path(out_path)
    if out.suffix.lower() not in suffixes:
        raise ToolError(f"{out.name}: the output must end in {' or '.join(suffixes)}")
    resolved = out.resolve()
    if any(Path(p).resolve() == resolved for p in inputs):
        raise ToolError(f"{out} is one of the input files; choose another output file")
    if out.exists() and not overwrite:
        raise ToolError(f"{out} already exists; choose another name or allow overwriting")
    if out.is_dir():
        raise ToolError(f"{out} is a folder; give a file name")
    return out
