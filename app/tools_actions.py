"""The LoRA tools as the Tools tab calls them: widget values in, (status, report, tables) out.

Each function calls one ``trainer.tools`` function, as ``trainer.commands.lora_cmd`` does
on the command line, and turns a refusal (ToolError, a missing file...) into a status
line instead of an exception. Plain Python: no gradio.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from trainer.tools.requests import (DYNAMIC_DEFAULTS, SAVE_PRECISIONS, ExtractRequest, MergeLorasRequest,
                                    SvdMergeRequest)

from .tab_common import LORA_SUFFIXES, USER_ERRORS, done, number, problem, report_html, text

# the page's choice for an option's None (ResizeRequest: no dynamic method, the input's precision)
FIXED_RANK = "fixed rank"
KEEP_PRECISION = "as the input"
AS_MERGE_PRECISION = "as the merge precision"  # MergeLorasRequest's save precision None
EXTRACT = ExtractRequest.model_construct()  # the declared defaults (the paths have none)
MERGE_LORAS = MergeLorasRequest.model_construct()
SVD_MERGE = SvdMergeRequest.model_construct()
CHECKPOINT_FORMATS = (".safetensors", ".ckpt")
MERGE_LORAS_NOTE = ("Merges up to four LoRAs into one LoRA as kohya's Merge LoRA does: each file's lora_down and "
                    "lora_up are multiplied by its ratio and added, so one LoRA at ratio 0.5 keeps a quarter of its "
                    "effect and different LoRAs also mix. The files need the same rank unless concatenated. "
                    "Merge LoRA (SVD) adds the weight changes themselves.")
SVD_MERGE_NOTE = ("Adds up to four LoRAs' weight changes, each times its ratio, and writes the sum as one LoRA of "
                  "the new rank (its best approximation at that rank; exact when the rank is at least the sum of "
                  "the ranks). The files may have any ranks.")
NO_NORM = "–"  # a LyCORIS module's ‖ΔW‖ needs the base weights
MERGE_SLOTS = 4
MODULE_HEADERS = ["module", "part", "kind", "rank", "alpha", "‖ΔW‖"]
SETTING_HEADERS = ["training setting (metadata)", "value"]
LogFn = Callable[[str], None]


def table(headers: list[str], rows: list[list]) -> dict:
    """A Dataframe value that keeps its headers even when there are no rows."""
    return {"headers": headers, "data": rows or [["" for _ in headers]]}


def has_rows(value: dict) -> bool:
    return any(cell not in ("", None) for row in value["data"] for cell in row)


def inspect(file: str, base: str = "") -> tuple[str, str, dict, dict]:
    """(status, report, training-settings table, modules table) of a LoRA file, verified against ``base`` if given."""
    from trainer.tools import inspect_lora, read_lora, verify_lora

    empty = table(SETTING_HEADERS, []), table(MODULE_HEADERS, [])
    if not text(file):
        return problem("Choose the LoRA file to inspect."), "", *empty
    try:
        lora = read_lora(text(file))
        report = inspect_lora(text(file), lora)
        match = verify_lora(lora, text(base)) if text(base) else None
    except USER_ERRORS as err:
        return problem(f"Cannot inspect: {err}"), "", *empty
    modules = [[m.name, m.role, m.kind, m.rank, f"{m.alpha:g}", _norm(m.norm)] for m in report.modules]
    settings = [list(row) for row in report.settings]
    body = report.format() + (match.format(limit=50) if match else "")
    if match is None:
        status = done(f"{report.summary()}. Give a base model to check every key against it.", report.problems)
    elif match.ok:
        status = done(f"Every key matches the base model: {match.summary()}.", report.problems)
    else:
        status = problem(f"Some keys do not match the base model: {match.summary()}.")
    return status, report_html(body), table(SETTING_HEADERS, settings), table(MODULE_HEADERS, modules)


def resize(file: str, out: str, rank, conv_rank=0, method: str = FIXED_RANK, param=None,
           precision: str = KEEP_PRECISION, overwrite: bool = False) -> tuple[str, str]:
    """(status, report). ``out`` empty: ``<file>-r<rank>...`` next to the input. ``conv_rank`` 0: as ``rank``."""
    from trainer.tools import resize_lora
    from trainer.tools.resize import default_resized_name

    if not text(file):
        return problem("Choose the LoRA file to resize."), ""
    dynamic = None if method == FIXED_RANK else method
    try:
        rank, conv_rank = number(rank, "New rank"), number(conv_rank or 0, "Conv rank")
        param = number(param, "Dynamic parameter", float) if dynamic else None
        target = text(out) or str(default_resized_name(text(file), rank, dynamic, param))
        result = resize_lora(text(file), target, rank, conv_rank=conv_rank or None, dynamic_method=dynamic,
                             dynamic_param=param, save_precision=_precision(precision), overwrite=bool(overwrite))
    except USER_ERRORS as err:
        return problem(f"Not resized: {err}"), ""
    return done(f"Saved {result.out_path}: {result.summary()}."), report_html(result.format(modules=True))


def extract(tuned: str, base: str, out: str, rank, conv_rank=EXTRACT.conv_rank, clamp_quantile=EXTRACT.clamp,
            min_diff=EXTRACT.min_diff, precision: str = EXTRACT.precision, overwrite: bool = False, log: LogFn | None = None) -> tuple[str, str]:
    """(status, report) of extracting ``tuned`` minus ``base``. ``conv_rank`` 0: no 3x3 convs;
    ``clamp_quantile`` 1 or more: no clamping."""
    from trainer.tools import extract_lora

    missing = _missing({"the fine-tuned model": tuned, "the base model": base, "the output file": out})
    if missing:
        return problem(f"Choose {missing} first."), ""
    lines = _LogLines(log)
    try:
        clamp = number(clamp_quantile if clamp_quantile not in (None, "") else 1, "Clamp quantile", float)
        result = extract_lora(text(base), text(tuned), text(out), number(rank, "Rank"),
                              conv_rank=number(conv_rank or 0, "Conv rank") or None,
                              clamp_quantile=clamp if 0 < clamp < 1 else None,
                              min_diff=number(min_diff, "Minimum difference", float),
                              save_precision=_precision(precision), overwrite=bool(overwrite), log=lines)
    except USER_ERRORS as err:
        return problem(f"Not extracted: {err}"), report_html(lines.text())
    return done(f"Saved {result.out_path}: {result.summary()}."), report_html(result.format(modules=True))


def merge(base: str, loras: list[tuple[str, float]], out: str, file_format: str = ".safetensors", half: bool = False,
          allow_unmatched: bool = False, overwrite: bool = False, log: LogFn | None = None) -> tuple[str, str]:
    """(status, report) of merging up to four (file, ratio) LoRAs into ``base``; empty files are skipped."""
    from trainer.tools import merge_into_checkpoint

    missing = _missing({"the base model": base, "the output file": out})
    if missing or not any(text(path) for path, _ in loras):
        return problem(f"Choose {missing or 'at least one LoRA file'} first."), ""
    try:
        chosen = _chosen(loras)
        target = checkpoint_path(text(out), file_format)
    except ValueError as err:
        return problem(str(err)), ""
    lines = _LogLines(log)
    try:
        result = merge_into_checkpoint(text(base), chosen, target, half=bool(half),
                                       allow_unmatched=bool(allow_unmatched), overwrite=bool(overwrite), log=lines)
    except USER_ERRORS as err:
        return problem(f"Not merged: {err}"), report_html(lines.text())
    return done(f"Saved {result.out_path}: {result.summary()}."), report_html(result.format())


def merge_loras(loras: list[tuple[str, float]], out: str, concat: bool = MERGE_LORAS.concat,
                precision: str = MERGE_LORAS.precision, save_precision: str = AS_MERGE_PRECISION,
                overwrite: bool = False, log: LogFn | None = None) -> tuple[str, str]:
    """(status, report) of merging up to four (file, ratio) LoRAs into one LoRA as sd-scripts' merge_lora.py does."""
    from trainer.tools.merge_loras import merge_loras as merge_files

    def run(chosen, target, lines):
        return merge_files(chosen, target, concat=bool(concat), precision=precision,
                           save_precision=_precision(save_precision), overwrite=bool(overwrite), log=lines)

    return _merge_into_lora(loras, out, run, log)


def svd_merge(loras: list[tuple[str, float]], out: str, rank, conv_rank=SVD_MERGE.conv_rank,
              clamp_quantile=SVD_MERGE.clamp, save_precision: str = SVD_MERGE.save_precision, overwrite: bool = False,
              log: LogFn | None = None) -> tuple[str, str]:
    """(status, report) of merging up to four (file, ratio) LoRAs into one LoRA of rank ``rank`` by SVD.
    ``conv_rank`` 0: as ``rank``; ``clamp_quantile`` 1 or more: no clamping."""
    from trainer.tools.svd_merge import svd_merge_loras

    def run(chosen, target, lines):
        clamp = number(clamp_quantile if clamp_quantile not in (None, "") else 1, "Clamp quantile", float)
        return svd_merge_loras(chosen, target, number(rank, "New rank"),
                               conv_rank=number(conv_rank or 0, "New conv rank") or None,
                               clamp_quantile=clamp if 0 < clamp < 1 else None, save_precision=save_precision,
                               overwrite=bool(overwrite), log=lines)

    return _merge_into_lora(loras, out, run, log, modules=True)


def _merge_into_lora(loras, out: str, run, log: LogFn | None, modules: bool = False) -> tuple[str, str]:
    """The two LoRA merges' shared checks, refusals and report; ``run(chosen, target, log)`` merges."""
    if not any(text(path) for path, _ in loras):
        return problem("Choose at least one LoRA file first."), ""
    if not text(out):
        return problem("Choose the output file first."), ""
    lines = _LogLines(log)
    try:
        result = run(_chosen(loras), lora_path(text(out)), lines)
    except USER_ERRORS as err:
        return problem(f"Not merged: {err}"), report_html(lines.text())
    return done(f"Saved {result.out_path}: {result.summary()}."), report_html(result.format(modules=modules))


def _chosen(loras: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The filled slots as (path, ratio); ValueError naming the slot whose ratio is not a number."""
    return [(text(path), number(ratio, f"The ratio of {Path(text(path)).name}", float))
            for path, ratio in loras if text(path)]


def lora_path(out: str) -> str:
    """The output path, with .safetensors added when it has no LoRA suffix."""
    return out if Path(out).suffix.lower() in LORA_SUFFIXES else out + ".safetensors"


def _norm(value: float) -> str:
    return NO_NORM if math.isnan(value) else f"{value:.4g}"


def checkpoint_path(out: str, file_format: str) -> str:
    """The output path with the chosen format: added when the name has no such suffix, refused when it has the other."""
    suffix = Path(out).suffix.lower()
    if suffix == file_format:
        return out
    if suffix in CHECKPOINT_FORMATS:
        raise ValueError(f"The output file ends in {suffix} but the format chosen is {file_format}; make them agree.")
    return out + file_format


def _precision(choice: str) -> str | None:
    return choice if choice in SAVE_PRECISIONS else None


def _missing(required: dict[str, str]) -> str:
    return next((label for label, value in required.items() if not text(value)), "")


class _LogLines:
    """A tool's log: kept for the report and passed on (to the page's progress text)."""

    def __init__(self, forward: LogFn | None):
        self.lines: list[str] = []
        self.forward = forward

    def __call__(self, message: str) -> None:
        self.lines.append(message)
        if self.forward is not None:
            self.forward(message)

    def text(self) -> str:
        return "\n".join(self.lines)
