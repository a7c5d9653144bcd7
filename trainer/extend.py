"""Extend a finished or stopped run by N steps or N epochs (CLI ``extend``, the GUI's "Train more").

The extension is a resume with a longer plan: the run's settings with ``resume`` set to its state folder
and more steps or epochs. The step and epoch counters go on from the saved position, so files continue
kohya's numbering and ``ss_steps``/``ss_epoch`` count lifetime steps; the learning-rate schedule is planned
over the new total and goes on at the saved step (``trainer.run_resume``). A run saved without state goes
on from its LoRA file: a weights-only state folder is written from it (position from its ``ss_*``
metadata) and the optimizer starts fresh.

Torch-free, except when writing that weights-only folder.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.problems import NekoyaError
from trainer.state_folder import STATE_FILE, Position

_SUFFIXES = re.compile(r"(-\d{6}|-step\d{8})?(-state)?$")
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")


class ExtendError(NekoyaError, ValueError):
    """The run cannot be extended as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class Extension:
    settings: Any  # the run's settings, resuming with the longer plan
    notes: tuple[str, ...]  # what the extension does, for the log
    position: Position  # where it goes on from
    total_epochs: int  # 0 when extended by steps (the plan derives them)


def run_name(source: str | os.PathLike) -> str:
    """The output name of a state folder or LoRA file: ``tiny-000002-state`` and ``tiny.safetensors`` -> tiny."""
    name = Path(os.path.normpath(source)).name
    if name.endswith(LORA_SUFFIXES):
        name = os.path.splitext(name)[0]
    return _SUFFIXES.sub("", name)


def find_run_config(folder: str | os.PathLike, output_name: str) -> str | None:
    """The newest settings file a run of ``output_name`` wrote in its output folder (``<name>_<time>.json``)."""
    pattern = re.compile(re.escape(output_name) + r"_\d{8}-\d{6}\.json")
    try:
        names = [n for n in os.listdir(folder) if pattern.fullmatch(n)]
    except OSError:
        return None
    return os.path.join(folder, max(names)) if names else None  # the time stamp sorts as text


def extend_run(settings: Any, source: str, *, steps: int = 0, epochs: int = 0) -> Extension:
    """The settings that extend the run saved in ``source`` (a state folder, or a LoRA file when the run saved
    no state) by ``steps`` or ``epochs``. Raises ExtendError."""
    if (steps > 0) == (epochs > 0):
        raise ExtendError("extend by a number of steps or a number of epochs (one of them, more than 0)")
    source = os.path.normpath(os.path.expanduser(source))
    if os.path.isdir(source):
        position, resume = read_state_position(source), source
        notes = [f"goes on from the training state {source} at step {position.step}"]
    elif os.path.isfile(source) and source.endswith(LORA_SUFFIXES):
        position = lora_position(source, settings)
        resume = write_weights_state(source, position, settings.output_dir or os.path.dirname(source))
        notes = [f"{source} has no saved training state: the run goes on from its LoRA weights at step "
                 f"{position.step} with a fresh optimizer (its moments start again from zero)"]
    else:
        raise ExtendError(f"{source} is neither a training state folder nor a LoRA file")
    reached = position.epoch if position.batches_done else position.epoch - 1  # the last epoch trained in
    if steps:
        update = {"max_train_steps": position.step + steps, "max_train_epochs": 0}
        plan = f"{steps} more steps, to step {position.step + steps}"
    else:
        update = {"epoch": reached + epochs, "max_train_steps": 0, "max_train_epochs": 0}
        plan = f"{epochs} more epoch(s), to epoch {reached + epochs}"
    notes.append(f"extended by {plan}: the {settings.lr_scheduler} learning-rate schedule is planned over the "
                 "longer run and goes on from the saved step as if the run had been planned that long")
    extended = settings.model_copy(update={**update, "resume": resume})
    return Extension(extended, tuple(notes), position, 0 if steps else reached + epochs)


def read_state_position(folder: str) -> Position:
    try:
        info = json.loads(Path(folder, STATE_FILE).read_text())
        return Position(int(info["current_step"]), int(info.get("epoch", info.get("current_epoch", 1))),
                        int(info.get("batches_done", 0)), int(info.get("seed", 0)))
    except (OSError, ValueError, KeyError) as exc:
        raise ExtendError(f"{folder} is not a training state folder ({exc})") from exc


def lora_position(path: str, settings: Any) -> Position:
    """Where a run saved without state stands: its LoRA file's ``ss_steps`` and ``ss_seed``, placed in the
    epochs of the run's step plan as sd-scripts places a resumed step count."""
    from trainer.data.plan import plan_steps

    meta = _metadata(path)
    if "ss_steps" not in meta:
        raise ExtendError(f"{path} does not say how many steps it was trained (no ss_steps): extend a .safetensors "
                          "file written by Nekoya or kohya_ss, or a state folder")
    plan = plan_steps(settings)
    if plan.errors:
        raise ExtendError(f"the run's step plan fails: {plan.errors[0]}")
    step = int(meta["ss_steps"])
    epoch, batches = plan.resume_position(step)
    return Position(step, epoch, batches, int(meta.get("ss_seed", 0) or 0))


def write_weights_state(lora_file: str, position: Position, folder: str) -> str:
    """A state folder holding the LoRA's weights and ``position`` but no optimizer or random state (the run
    then starts those fresh); returns its path."""
    from safetensors.torch import load_file

    from trainer.state_folder import save_state

    target = os.path.join(folder, f"{run_name(lora_file)}-weights-step{position.step:08d}-state")
    save_state(target, load_file(lora_file), {}, {}, position)
    return target


def keep_previous_final(settings: Any, extension: Extension) -> str | None:
    """Before the extended run writes its final file over the old one: rename the old final file (when it
    is the file of the saved step) to the name kohya gives a file of that epoch (or step) in a longer run.
    Returns what was done, or None."""
    from trainer.saving import epoch_file_name, final_file_name, step_file_name  # torch: only when training next

    ext = {"ckpt": ".ckpt", "pt": ".pt"}.get(settings.save_model_as, ".safetensors")
    folder, name, p = settings.output_dir or ".", settings.output_name, extension.position
    final = os.path.join(folder, final_file_name(name, ext))
    if not os.path.isfile(final) or ext != ".safetensors" or _metadata(final).get("ss_steps") != str(p.step):
        return None
    every = int(settings.save_every_n_epochs or 0)
    at_epoch_end, epoch = p.batches_done == 0, p.epoch - 1
    due = at_epoch_end and every > 0 and epoch % every == 0  # the extended run goes past this epoch
    target = os.path.join(folder, epoch_file_name(name, epoch, ext) if due else step_file_name(name, p.step, ext))
    if os.path.exists(target):
        return None
    os.replace(final, target)
    return f"the previous final file {os.path.basename(final)} (step {p.step}) is kept as {os.path.basename(target)}"


def _metadata(path: str) -> dict:
    if not path.endswith(".safetensors"):
        return {}
    from trainer.checkpoints.integrity import read_safetensors_header

    try:
        return dict(read_safetensors_header(Path(path)).metadata)
    except (OSError, ValueError) as exc:
        raise ExtendError(f"cannot read {path}: {exc}") from exc
