"""Resume from a state folder sd-scripts wrote (``--save_state``: accelerate's ``save_state`` plus
``train_state.json``), so a kohya_ss run can go on in Nekoya.

accelerate saves each prepared model as ``model.safetensors``, ``model_1.safetensors``... (the frozen UNet and
text encoders too), the optimizer as ``optimizer.bin``, the scheduler as ``scheduler.bin`` and the random states
as ``random_states_0.pkl``. Nekoya takes the LoRA from the model file whose keys are LoRA keys, the optimizer state
(read weights-only, its groups matched to Nekoya's by their parameters' shapes) and the step; the scheduler is
replayed to that step. The random states are a pickle, which Nekoya does not open: the run's generators are seeded
from the seed and the step instead, and the log says so.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

from trainer.state_folder import MANIFEST_FILE, STATE_FILE, WEIGHTS_FILE, LoadedState, Position, StateError

OPTIMIZER_BIN = "optimizer.bin"
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
SD_SCRIPTS_MARK = "sd_scripts_optimizer"  # stepper_state key: an sd-scripts optimizer state to match to ours


def is_sd_scripts_state(folder: str) -> bool:
    """A folder with sd-scripts' train_state.json and accelerate's files, and none of Nekoya's own."""
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    return (STATE_FILE in names and MANIFEST_FILE not in names and WEIGHTS_FILE not in names
            and (OPTIMIZER_BIN in names or any(n.startswith("model") and n.endswith(".safetensors") for n in names)))


def load_sd_scripts_state(folder: str, steps_plan: Any) -> LoadedState:
    """The LoRA, optimizer state and position of an sd-scripts state folder (StateError names what is missing)."""
    from safetensors.torch import load_file

    info = _json(os.path.join(folder, STATE_FILE))
    step = int(info.get("current_step", 0))
    epoch, batches = steps_plan.resume_position(step) if steps_plan is not None else (1, 0)
    optimizer = _optimizer_state(os.path.join(folder, OPTIMIZER_BIN))
    return LoadedState(position=Position(step=step, epoch=epoch, batches_done=batches, seed=0),
                       lora_tensors=load_file(_lora_file(folder)), stepper_state={SD_SCRIPTS_MARK: optimizer},
                       rng=None)


def _lora_file(folder: str) -> str:
    from safetensors import safe_open

    for name in sorted(os.listdir(folder)):
        if not (name.startswith("model") and name.endswith(".safetensors")):
            continue
        path = os.path.join(folder, name)
        with safe_open(path, "pt") as f:
            if any(key.startswith(LORA_PREFIXES) for key in f.keys()):
                return path
    raise StateError(f"{folder} holds no LoRA weights: none of its model*.safetensors files has lora_unet_/lora_te "
                     "keys", folder, "choose the state folder of a LoRA run (sd-scripts --save_state)")


def _optimizer_state(path: str) -> dict | None:
    """accelerate's optimizer.bin read weights-only; None when absent."""
    if not os.path.isfile(path):
        return None
    import torch

    try:
        with open(path, "rb") as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - named below, never unpickled otherwise
        raise StateError(f"{path} cannot be read weights-only ({type(exc).__name__}); Nekoya does not unpickle "
                         "other objects", path, "resume from the LoRA file instead (Network weights), with a "
                         "fresh optimizer") from None


def _json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read {path}: {exc}", path) from None


def apply_sd_scripts_optimizer(stepper: Any, theirs: dict | None, step: int, log) -> None:
    """Load sd-scripts' optimizer state into the run's optimizer (when its groups match ours) and replay the
    LR schedule to ``step``; the log says what was restored."""
    import warnings

    matched = matched_optimizer_state(theirs, stepper.optimizer) if theirs is not None else None
    if matched is not None:
        stepper.optimizer.load_state_dict(matched)
        log("optimizer state restored from sd-scripts' optimizer.bin")
    else:
        why = "there is no optimizer.bin" if theirs is None else "its parameter groups do not match this run's"
        log(f"the optimizer starts fresh: {why} (another rank, LoRA type or learning-rate split?)", "warning")
    with warnings.catch_warnings():  # replaying the schedule without optimizer steps is intended here
        warnings.simplefilter("ignore")
        for _ in range(step):
            stepper.scheduler.step()
    log("sd-scripts' random states are a pickle, which Nekoya does not open: the run's generators are seeded from "
        "the seed and the step", "warning")


def matched_optimizer_state(theirs: dict, optimizer: Any) -> dict | None:
    """sd-scripts' optimizer state rearranged for ``optimizer`` (sd-scripts lists the text encoder's groups first,
    Nekoya the UNet's): each of our groups takes the unused group of theirs whose parameters' state has our
    parameters' shapes, and keeps its own hyperparameters. None when the groups do not match."""
    ours = optimizer.state_dict()
    their_groups = theirs.get("param_groups", [])
    if len(their_groups) != len(optimizer.param_groups):
        return None
    used: set[int] = set()
    state = {}
    for live, saved in zip(optimizer.param_groups, ours["param_groups"]):
        shapes = [tuple(p.shape) for p in live["params"]]
        match = next((i for i, g in enumerate(their_groups) if i not in used and _fits(theirs, g, shapes)), None)
        if match is None:
            return None
        used.add(match)
        for our_index, their_index in zip(saved["params"], their_groups[match]["params"]):
            if their_index in theirs.get("state", {}):
                state[our_index] = theirs["state"][their_index]
    return {"state": state, "param_groups": ours["param_groups"]}


def _fits(theirs: dict, group: dict, shapes: list[tuple]) -> bool:
    """Whether a saved group holds parameters of these shapes (its state tensors such as exp_avg have them)."""
    if len(group["params"]) != len(shapes):
        return False
    for index, shape in zip(group["params"], shapes):
        tensors = [v for v in theirs.get("state", {}).get(index, {}).values() if hasattr(v, "dim") and v.dim() > 0]
        if any(tuple(t.shape) != shape for t in tensors):
            return False
    return True
