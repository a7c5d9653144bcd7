"""LoRA tools: inspect/verify, resize, extract, and merge LoRAs into a checkpoint.

Plain functions returning dataclasses with ``format()`` (text for people) and
``to_dict()`` (JSON); the CLI (``python -m trainer lora ...``) and the GUI both call
these. Importing this package is free: each name loads its module (and torch) on
first use, so the GUI can import it at start-up.

* :func:`inspect_lora` (path) -> :class:`LoraReport`
* :func:`verify_lora` (lora, base) -> :class:`MatchReport`
* :func:`resize_lora` (path, out, rank, ...) -> :class:`ResizeResult`
* :func:`extract_lora` (base, tuned, out, rank, ...) -> :class:`ExtractResult`
* :func:`merge_into_checkpoint` (base, loras, out, ...) -> :class:`MergeResult`
"""
from __future__ import annotations

import importlib

# public name -> module that defines it
_EXPORTS = {
    "LoraFormatError": "lora_file",
    "read_lora": "lora_file",
    "inspect_lora": "lora_info",
    "verify_lora": "lora_info",
    "LoraReport": "lora_info",
    "MatchReport": "lora_info",
    "resize_lora": "resize",
    "ResizeResult": "resize",
    "extract_lora": "extract",
    "ExtractResult": "extract",
    "merge_into_checkpoint": "merge",
    "MergeResult": "merge",
    "ToolError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
