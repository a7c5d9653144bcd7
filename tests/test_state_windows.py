"""save_last_n_steps_state keeps only the newest step state folders, as sd-scripts removes the older ones."""
from __future__ import annotations

import pytest

from test_train import images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer.loop import train


@pytest.mark.slow
@pytest.mark.parametrize("window, kept", [({"save_last_n_steps_state": 2}, [3, 4, 5]),
                                          ({"save_last_n_steps": 3}, [2, 3, 4, 5])])
def test_step_state_folders_follow_their_window(window, kept, tiny_sd1_dir, images, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    result = train(tiny_settings(tiny_sd1_dir, images, out, max_train_steps=6, epoch=3, save_every_n_steps=1,
                                 save_state=True, **window))
    assert result.status == "finished", result.error
    steps = sorted(int(p.name[len("tiny-step"):-len("-state")]) for p in out.glob("tiny-step*-state"))
    # sd-scripts keeps the saves of the last N steps (at step 5 with N = 2: steps 3 to 5); step 6 is the end,
    # whose state is the final tiny-state
    assert steps == kept
    assert (out / "tiny-state").is_dir()
