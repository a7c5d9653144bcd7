"""A state folder in sd-scripts' layout (accelerate's save_state: model*.safetensors, optimizer.bin, scheduler.bin,
random_states_0.pkl, train_state.json) resumes: LoRA weights, optimizer state and step; the pickle is not opened."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from test_train import Recorder, images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer.loop import train
from trainer.preflight import check


def _sd_scripts_folder(nekoya_state, target):
    """The Nekoya state folder rewritten as sd-scripts writes it: the frozen UNet is model.safetensors, the
    network model_1.safetensors, the optimizer's groups text encoder first (sd-scripts' order)."""
    target.mkdir()
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(target / "model.safetensors"))
    save_file(load_file(str(nekoya_state / "lora.safetensors")), str(target / "model_1.safetensors"))
    ours = torch.load(nekoya_state / "optimizer.pt", weights_only=True)["optimizer"]
    groups = list(reversed(ours["param_groups"]))  # Nekoya: unet, textencoder -> sd-scripts: textencoder, unet
    state, renumbered, index = {}, [], 0
    for group in groups:
        params = []
        for old in group["params"]:
            if old in ours["state"]:
                state[index] = ours["state"][old]
            params.append(index)
            index += 1
        renumbered.append({k: v for k, v in group.items() if k != "name"} | {"params": params})
    torch.save({"state": state, "param_groups": renumbered}, target / "optimizer.bin")
    torch.save({"last_epoch": 2, "_step_count": 3}, target / "scheduler.bin")
    (target / "random_states_0.pkl").write_bytes(pickle.dumps({"numpy_random_seed": np.random.get_state()}))
    (target / "train_state.json").write_text(json.dumps({"current_epoch": 2, "current_step": 2}))
    return ours


@pytest.mark.slow
def test_an_sd_scripts_state_folder_resumes_lora_optimizer_and_step(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    first = tiny_settings(tiny_sd1_dir, images, tmp_path / "a", max_train_steps=2, epoch=3, save_state=True)
    assert train(first).status == "finished"
    folder = tmp_path / "sd-scripts-state"
    _sd_scripts_folder(tmp_path / "a" / "tiny-state", folder)
    settings = first.model_copy(update={"max_train_steps": 4, "resume": str(folder),
                                        "output_dir": str(tmp_path / "b")})
    notes = [p for p in check(settings, deep=True).problems if p.field == "resume"]
    assert [p.severity for p in notes] == ["note"] and "sd-scripts" in notes[0].message
    recorder = Recorder()
    result = train(settings, recorder)
    assert result.status == "finished" and result.step == 4, result.error
    logs = recorder.logs()
    assert "optimizer state restored from sd-scripts' optimizer.bin" in logs
    assert "resumed from" in logs and "at step 2" in logs
    assert "random states are a pickle" in logs


def test_groups_are_matched_by_shape_and_a_mismatch_starts_fresh():
    from trainer.sd_scripts_state import matched_optimizer_state

    unet, te = [torch.nn.Parameter(torch.zeros(4, 8))], [torch.nn.Parameter(torch.zeros(2, 3))]
    optimizer = torch.optim.AdamW([{"params": unet, "lr": 1e-4}, {"params": te, "lr": 5e-5}])
    theirs = {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.ones(2, 3), "exp_avg_sq": torch.ones(2, 3)},
                        1: {"step": torch.tensor(2.0), "exp_avg": torch.full((4, 8), 2.0),
                            "exp_avg_sq": torch.ones(4, 8)}},
              "param_groups": [{"params": [0], "lr": 1.0}, {"params": [1], "lr": 1.0}]}
    matched = matched_optimizer_state(theirs, optimizer)
    optimizer.load_state_dict(matched)
    assert torch.equal(optimizer.state[unet[0]]["exp_avg"], torch.full((4, 8), 2.0))
    assert optimizer.param_groups[0]["lr"] == 1e-4  # our hyperparameters, their moments
    theirs["state"][1]["exp_avg"] = torch.ones(5, 8)
    assert matched_optimizer_state(theirs, optimizer) is None


def test_a_folder_without_lora_weights_is_named(tmp_path):
    from trainer.sd_scripts_state import load_sd_scripts_state
    from trainer.state_folder import StateError

    save_file({"conv_in.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "train_state.json").write_text('{"current_step": 3}')
    with pytest.raises(StateError, match="no LoRA weights"):
        load_sd_scripts_state(str(tmp_path), None)
