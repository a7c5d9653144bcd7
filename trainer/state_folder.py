"""Training state folders (``--save_state``): written whole, checked before a resume.

A state folder holds the LoRA weights, the optimizer, scheduler and grad-scaler
state, every RNG the run draws from, ``train_state.json`` with the position
(``current_step``, ``current_epoch`` as sd-scripts, plus the batch within the
epoch), and ``manifest.json``, written last, with every file's size and sha256.

It is written into ``<folder>.tmp-<pid>`` and renamed into place (the previous
folder moved aside to ``<folder>.old-<pid>`` first, deleted last), so a crash
leaves the old folder or the new one whole, never a mix; the next run in that
folder finishes or undoes an interrupted swap (``recover_state_folders``). A
folder whose files do not match its manifest is refused, naming the file.

No torch import at module level: preflight checks folders with this module.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from typing import Any

from trainer.problems import NekoyaError, Problem
from trainer.safety import SaveError, atomic_write_bytes, fsync_folder, pid_alive, remove_stale_temp_files

STATE_FILE = "train_state.json"
WEIGHTS_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
MANIFEST_FILE = "manifest.json"
_LEFTOVER = re.compile(r"^(?P<folder>.+-state)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")
_RESUME_FIX = ("resume from another state folder (an earlier -stepNNNNNNNN-state or -NNNNNN-state), "
               "or clear Resume to start from the beginning")


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 1  # 1-based epoch in progress (or just finished)
    batches_done: int = 0  # batches of ``epoch`` already trained
    seed: int = 0
    processes: int = 1  # of the run that saved it: batches_done counts that many processes' batches


class StateError(NekoyaError, ValueError):
    """A state folder that cannot be resumed from; ``file`` is the file to blame."""

    def __init__(self, message: str, file: str, fix: str = _RESUME_FIX) -> None:
        super().__init__(f"{message}. To fix: {fix}")
        self.message, self.file, self.fix = message, file, fix


def save_state(folder: str, lora_tensors: dict, stepper_state: dict, rng: dict, position: Position) -> None:
    """Write a resumable state folder as a whole (see above); raises SaveError, leaving any previous one."""
    from safetensors.torch import save

    info = {"current_step": position.step, "current_epoch": position.epoch, **asdict(position)}
    contents = {WEIGHTS_FILE: save(lora_tensors), OPTIMIZER_FILE: _torch_bytes(stepper_state),
                RNG_FILE: _torch_bytes(rng), STATE_FILE: json.dumps(info, indent=2).encode()}
    manifest = {"step": position.step, "files": {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in contents.items()}}
    contents[MANIFEST_FILE] = json.dumps(manifest, indent=2).encode()
    staging = f"{folder}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        for name, data in contents.items():  # the manifest last
            atomic_write_bytes(os.path.join(staging, name), data)
        _swap_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_into_place(staging: str, folder: str) -> None:
    aside = f"{folder}.old-{os.getpid()}" if os.path.isdir(folder) else None
    try:
        if aside:
            shutil.rmtree(aside, ignore_errors=True)
            _move(folder, aside)
        _move(staging, folder)
    except OSError as exc:
        if aside and not os.path.exists(folder):
            _move(aside, folder)
        raise SaveError(f"could not put the training state in place at {folder}: {exc}", path=folder,
                        previous_intact=True, free_bytes=None, cause_errno=exc.errno) from exc
    if aside:
        shutil.rmtree(aside, ignore_errors=True)
    fsync_folder(os.path.dirname(os.path.abspath(folder)))


def _move(source: str, target: str) -> None:
    os.rename(source, target)


def recover_state_folders(parent: str) -> list[str]:
    """Finish or undo state-folder swaps that a dead process left in ``parent``; returns what it did.

    The new folder wins when it is complete (its manifest checks out), else the old one comes back;
    leftovers beside a folder in place are deleted. A live process's leftovers are not touched.
    """
    done = []
    try:
        names = sorted(os.listdir(parent), key=lambda n: ".old-" in n)  # new ("tmp") before old
    except OSError:
        return done
    for name in names:
        match = _LEFTOVER.match(name)
        if not match or pid_alive(int(match["pid"])):
            continue
        leftover, folder = os.path.join(parent, name), os.path.join(parent, match["folder"])
        whole = match["kind"] == "old" or check_state_folder(leftover) is None
        try:
            if whole and not os.path.exists(folder):
                _move(leftover, folder)
                done.append(f"{folder} restored from an interrupted save")
            else:
                shutil.rmtree(leftover)
                done.append(f"removed {leftover}, left by an interrupted save")
        except OSError:
            continue
    return done


def recover_interrupted_saves(*folders: str) -> list[str]:
    """Before a run: in each folder, remove dead processes' temp files and mend interrupted state swaps.
    Returns lines saying what was done; never raises."""
    done = []
    for folder in dict.fromkeys(f for f in folders if f and os.path.isdir(f)):
        removed = remove_stale_temp_files(folder)
        if removed:
            done.append(f"removed {len(removed)} temp file(s) of interrupted saves from {folder}")
        done += recover_state_folders(folder)
    return done


def check_state_folder(folder: str | os.PathLike, *, hashes: bool = True) -> Problem | None:
    """None when ``folder`` can be resumed from; else the problem, naming the file. ``hashes=False``
    checks sizes only (fast: the GUI's check on every edit)."""
    folder = os.fspath(folder)
    try:
        manifest = _read_manifest(folder)
        if manifest is None:
            return Problem("warning", None, f"{folder} has no {MANIFEST_FILE} (saved by an older Nekoya), so it "
                           "cannot be checked for files from different saves", file=folder)
        for name in manifest["files"]:
            _check_file(folder, name, manifest, None)
            if hashes:
                _check_file(folder, name, manifest, _read(os.path.join(folder, name)))
    except StateError as exc:
        return Problem("error", None, exc.message, exc.fix, exc.file)
    return None


@dataclass
class LoadedState:
    position: Position
    lora_tensors: dict
    stepper_state: dict
    rng: dict[str, Any]


def load_state(folder: str) -> LoadedState:
    """Read a state folder, each file checked against the manifest (StateError names a mismatch)."""
    from safetensors.torch import load

    manifest = _read_manifest(folder)
    contents = {}
    for name in (STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE):
        path = os.path.join(folder, name)
        contents[name] = _read(path)
        if manifest is not None:
            _check_file(folder, name, manifest, contents[name])
    info = json.loads(contents[STATE_FILE])
    position = Position(
        step=int(info["current_step"]),
        epoch=int(info.get("epoch", info.get("current_epoch", 1))),
        batches_done=int(info.get("batches_done", 0)),
        seed=int(info.get("seed", 0)),
        processes=int(info.get("processes", 1)),
    )
    return LoadedState(
        position=position,
        lora_tensors=load(contents[WEIGHTS_FILE]),
        stepper_state=_torch_load(contents[OPTIMIZER_FILE]),
        rng=_torch_load(contents[RNG_FILE]),
    )


def _read_manifest(folder: str) -> dict | None:
    """The manifest, or None for a folder saved before manifests existed; StateError when neither."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, STATE_FILE)):
            return None
        raise StateError(f"{folder} is not a training state folder (no {STATE_FILE})", folder,
                         "choose a <name>-state folder written by Save training state, or clear Resume")
    try:
        manifest = json.loads(_read(path))
        files = manifest["files"]
        if not all(name in files for name in (STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE)):
            raise KeyError("a state file is not listed")
        return manifest
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path} is damaged ({exc})", path) from exc


def _check_file(folder: str, name: str, manifest: dict, data: bytes | None) -> None:
    """StateError unless the file has the manifest's size (and sha256, when ``data`` is given)."""
    path = os.path.join(folder, name)
    expected = manifest["files"][name]
    if not os.path.isfile(path):
        raise StateError(f"{path} is missing from the state folder", path)
    size = len(data) if data is not None else os.path.getsize(path)
    if size != expected["size"] or (data is not None and hashlib.sha256(data).hexdigest() != expected["sha256"]):
        raise StateError(f"{path} does not match the folder's {MANIFEST_FILE} (saved at step {manifest.get('step')}): "
                         "the folder mixes files from different saves, or the file is damaged", path)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}", path) from exc


def _torch_load(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
