"""A run that ends on its step cap, resumed with a larger max_train_steps, goes on from where it stopped
(mid-epoch included) and saves; the result equals one uninterrupted run of the larger cap."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from test_train import images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer.loop import train


@pytest.mark.slow
@pytest.mark.parametrize("first_cap", [3, 4])  # mid-epoch (2 steps per epoch) and at an epoch's end
def test_extending_a_finished_run_continues_and_equals_a_straight_run(first_cap, tiny_sd1_dir, images,  # noqa: F811
                                                                      tmp_path):
    first = tiny_settings(tiny_sd1_dir, images, tmp_path / "a", max_train_steps=first_cap, epoch=5, save_state=True)
    done = train(first)
    assert done.status == "finished" and done.step == first_cap
    state = tmp_path / "a" / "tiny-state"
    position = json.loads((state / "train_state.json").read_text())
    assert (position["epoch"], position["batches_done"]) == ((2, 1) if first_cap == 3 else (3, 0))
    extended = train(first.model_copy(update={"max_train_steps": 6, "resume": str(state)}))
    assert extended.status == "finished" and extended.step == 6, extended.error
    straight = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "b", max_train_steps=6, epoch=5))
    a, b = load_file(extended.files[0]), load_file(straight.files[0])
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_seed_0_records_the_seed_the_run_used(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    """kohya's ss_seed says how to repeat a run: with seed 0 (random) it is the seed actually drawn, and
    training again with that seed gives the same file."""
    from safetensors import safe_open

    first = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "a", seed=0, max_train_steps=2))
    with safe_open(first.files[-1], "pt") as f:
        seed = int(f.metadata()["ss_seed"])
    assert seed > 0
    again = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "b", seed=seed, max_train_steps=2))
    a, b = load_file(first.files[-1]), load_file(again.files[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)
