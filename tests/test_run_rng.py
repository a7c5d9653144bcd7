"""A run draws only from its own generators: it leaves the process-wide RNGs as they were, its result does
not depend on draws made on another thread meanwhile, and a state folder saved before the run had its own
dropout generator (global RNG states) still resumes (CPU, tiny SD1)."""
from __future__ import annotations

import random
import threading

import pytest
import torch
from safetensors.torch import load_file

from test_train import Recorder, images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer import events as ev
from trainer.loop import train
from trainer.state_folder import load_state, save_state

pytestmark = pytest.mark.slow  # trains tiny models end to end

DROPOUTS = dict(network_dropout=0.2, rank_dropout=0.2, module_dropout=0.2)


def _weights(folder) -> dict:
    return load_file(str(folder / "tiny.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_run_leaves_the_global_rngs_untouched(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    torch_before, python_before = torch.get_rng_state(), random.getstate()
    result = train(tiny_settings(tiny_sd1_dir, images, tmp_path, **DROPOUTS))
    assert result.status == "finished", result.error
    assert torch.equal(torch.get_rng_state(), torch_before)
    assert random.getstate() == python_before


def test_a_runs_result_does_not_depend_on_global_draws_on_another_thread(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    alone = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "alone", epoch=2, **DROPOUTS))
    assert alone.status == "finished", alone.error

    done = threading.Event()

    def meddle():  # what another job in the process may do while the run trains
        n = 0
        while not done.is_set():
            n += 1
            torch.manual_seed(n)
            torch.rand(64)
            random.seed(n)

    thread = threading.Thread(target=meddle)
    thread.start()
    try:
        beside = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "beside", epoch=2, **DROPOUTS))
    finally:
        done.set()
        thread.join()
    assert beside.status == "finished", beside.error
    _assert_same(_weights(tmp_path / "alone"), _weights(tmp_path / "beside"))


def test_a_state_folder_with_global_rng_states_still_resumes(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    """An older Nekoya saved torch's and Python's global states beside the data/noise generator: the run
    resumes with the data and noise restored (bit-exact without dropouts) and says the dropouts are not."""
    straight = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "a", epoch=2, save_every_n_epochs=1,
                                   save_state=True))
    assert straight.status == "finished", straight.error
    folder = tmp_path / "a" / "tiny-000001-state"
    state = load_state(str(folder))
    old_rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "generator": state.rng["generator"],
               "generator_device": state.rng["generator_device"]}
    save_state(str(folder), state.lora_tensors, state.stepper_state, old_rng, state.position)

    rec = Recorder()
    resumed = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "b", epoch=2, resume=str(folder)), rec)
    assert resumed.status == "finished", resumed.error
    assert rec.of(ev.Started)[0].start_step == 2 and resumed.step == 4
    assert "dropout randomness is not restored bit-exactly" in rec.logs()
    _assert_same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
