"""Output checks: the folder can be written, the name is a valid file name on every
system, nothing is overwritten by surprise, and the disk has room for the saves."""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path

from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem
from trainer.safety import free_bytes

FILE_EXTENSIONS = {"safetensors": ".safetensors", "ckpt": ".ckpt"}
# Refused by Windows, macOS or Linux in a file name (plus control characters).
BAD_NAME_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
MAX_NAME_BYTES = 200  # 255 is the usual limit; leave room for "-000001.safetensors" and temp suffixes
SAVE_BYTES = {"float": 4, "fp16": 2, "bf16": 2}
GIB = 1024**3


def writable_problem(folder: Path) -> str | None:
    """None when a file can be created in ``folder`` (or in the folder that would create it)."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            return f"none of the folders in {folder} exist"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, so the folder {folder} cannot be created"
    try:  # os.access is wrong for root and for some network drives: really create a file
        fd, probe = tempfile.mkstemp(prefix=".nekoya-write-test-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        return f"cannot write in {existing}: {exc.strerror or exc}"
    return None


@preflight_check("output.folder")
def check_output_folder(ctx: CheckContext):
    value = ctx.settings.output_dir.strip()
    if not value:
        yield Problem("error", "output_dir", "Output folder is not set", fix="choose the folder where the LoRA files go")
        return
    folder = Path(value).expanduser()
    if folder.exists() and not folder.is_dir():
        yield Problem("error", "output_dir", f"{folder} is a file, not a folder", fix="choose a folder", file=value)
        return
    problem = writable_problem(folder)
    if problem:
        yield Problem("error", "output_dir", problem, fix="choose a folder you can write to", file=value)
    elif not folder.exists():
        yield Problem("note", "output_dir", f"{folder} does not exist yet; it will be created", file=value)


@preflight_check("output.logging_folder")
def check_logging_folder(ctx: CheckContext):
    value = ctx.settings.logging_dir.strip()
    if value:
        problem = writable_problem(Path(value).expanduser())
        if problem:
            yield Problem("warning", "logging_dir", problem + "; no TensorBoard logs would be written",
                          fix="choose a folder you can write to, or clear the field", file=value)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file name everywhere, or None."""
    if name.strip() in ("", ".", ".."):
        return "the name is empty"
    bad = sorted(set(BAD_NAME_CHARS.findall(name)))
    if bad:
        shown = " ".join(repr(c) for c in bad)
        separators = " (a path separator: the name is a file name, the folder is Output folder)" if {"/", "\\"} & set(bad) else ""
        return f"contains {shown}{separators}, which file systems refuse"
    if name.split(".")[0].upper() in WINDOWS_RESERVED:
        return f"'{name}' is a reserved device name on Windows"
    if name != name.rstrip(" ."):
        return "ends with a space or a dot, which Windows drops"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"is too long ({len(name.encode('utf-8'))} bytes; at most {MAX_NAME_BYTES})"
    return None


@preflight_check("output.name")
def check_output_name(ctx: CheckContext):
    name = ctx.settings.output_name
    problem = name_problem(name)
    if problem:
        safe = BAD_NAME_CHARS.sub("_", name).strip(" .") or "my_lora"
        yield Problem("error", "output_name", f"Model output name {name!r} {problem}", fix=f"use letters, digits, '-' or '_', e.g. {safe!r}")


def existing_outputs(folder: Path, name: str, extension: str) -> list[Path]:
    """Files a run with this name would replace: the final file and epoch/step files."""
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(name) + r"(-\d{6}|-step\d{8})?" + re.escape(extension) + "$")
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))


@preflight_check("output.overwrite")
def check_overwrite(ctx: CheckContext):
    s = ctx.settings
    if not s.output_dir.strip() or name_problem(s.output_name):
        return
    folder = Path(s.output_dir.strip()).expanduser()
    found = existing_outputs(folder, s.output_name, FILE_EXTENSIONS.get(s.save_model_as, ".safetensors"))
    if found:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        yield Problem("warning", "output_name", f"{len(found)} file(s) from an earlier run would be overwritten: {names}",
                      fix=f"change Model output name (e.g. '{s.output_name}_2') or move the old files away",
                      file=str(found[0]))


@preflight_check("output.disk_space")
def check_disk_space(ctx: CheckContext):
    s = ctx.settings
    folder = Path(s.output_dir.strip()).expanduser() if s.output_dir.strip() else None
    if folder is None or writable_problem(folder):
        return
    need = expected_output_bytes(s, ctx.memory.trainable_params, ctx.plan.epochs if ctx.plan else s.epoch)
    free = free_bytes(folder)
    if free is not None and need > free:
        yield Problem("error", "output_dir", f"the saves need about {need / GIB:.2f} GiB but only {free / GIB:.2f} GiB "
                      f"is free on the drive of {folder}", fix="free some space, save less often, or save to another drive",
                      file=str(folder))


def expected_output_bytes(settings, trainable_params: int, epochs: int) -> int:
    """LoRA files kept at the end (per-epoch saves, the final file) plus state folders when saved."""
    file_bytes = trainable_params * SAVE_BYTES.get(settings.save_precision, 4)
    every = settings.save_every_n_epochs
    saves = 1 + ((epochs - 1) // every if every > 0 else 0)
    if settings.save_last_n_epochs > 0:
        saves = min(saves, settings.save_last_n_epochs + 1)
    # A training state holds the fp32 weights and an optimizer state of about twice their size.
    state = trainable_params * 12 if settings.save_state or settings.save_state_on_train_end else 0
    return saves * (file_bytes + state)


@preflight_check("output.resume")
def check_resume(ctx: CheckContext):
    value = ctx.settings.resume.strip()
    if value and not Path(value).expanduser().is_dir():
        yield Problem("error", "resume", f"{value} is not a folder", fix="choose a <name>-state folder written by "
                      "Save training state, or clear the field", file=value)
    elif value:  # a mix of two saves or a damaged file is refused here, naming the file
        from trainer.sd_scripts_state import is_sd_scripts_state
        from trainer.state_folder import check_state_folder

        folder = Path(value).expanduser()
        if is_sd_scripts_state(str(folder)):
            yield Problem("note", "resume", f"{value} was written by sd-scripts (kohya_ss): the LoRA, the optimizer "
                          "state and the step go on; its random states (a pickle) are not opened, so the run's "
                          "generators are reseeded", file=value)
            return
        problem = check_state_folder(folder, hashes=ctx.deep)
        if problem:
            yield replace(problem, field="resume")


@preflight_check("output.samples")
def check_samples(ctx: CheckContext):
    s = ctx.settings
    if (s.sample_every_n_steps or s.sample_every_n_epochs) and not s.sample_prompts.strip():
        yield Problem("warning", "sample_prompts", "sampling is on but there are no sample prompts, so no samples are made",
                      fix="write one prompt per line, or set Sample every n steps/epochs to 0")
