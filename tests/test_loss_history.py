"""The run's loss history is append-only: a snapshot never changes and taking one copies nothing."""
from __future__ import annotations

import pytest

from app.live_panel import loss_chart_svg
from app.loss_history import LossHistory, LossPoints
from app.run_manager import RunState
from trainer.events import Memory, Step

MEMORY = Memory(device="cpu", rss_mb=512.0)


def step_event(step: int, total: int = 100_000) -> Step:
    return Step(step, total, 1, 1, loss=1.0 / step, avg_loss=1.2 / step, lr=1e-4, lrs={"unet": 1e-4},
                it_per_s=10.0, elapsed_s=step / 10, eta_s=(total - step) / 10, memory=MEMORY)


def test_a_view_is_the_points_appended_before_it_was_taken():
    history = LossHistory()
    history.append((1, 0.5, 0.5))
    history.append((2, 0.4, 0.45))
    early = history.view()
    history.append((3, 0.3, 0.4))
    late = history.view()
    assert len(early) == 2 and list(early) == [(1, 0.5, 0.5), (2, 0.4, 0.45)]
    assert early[-1] == (2, 0.4, 0.45) and early[:1] == ((1, 0.5, 0.5),) and early[::-1][0] == (2, 0.4, 0.45)
    with pytest.raises(IndexError):
        early[2]
    assert late == ((1, 0.5, 0.5), (2, 0.4, 0.45), (3, 0.3, 0.4)) and late != early
    assert hash(early) == hash(tuple(early)) and not LossPoints()


def test_snapshots_of_a_long_run_share_one_history():
    state = RunState(run_id=1, output_name="unit")
    for step in range(1, 101):
        state.apply(step_event(step))
    at_100 = state.snapshot().losses
    for step in range(101, 100_001):
        state.apply(step_event(step))
    at_100k = state.snapshot().losses
    assert len(at_100) == 100 and at_100[-1][0] == 100  # taken earlier, unchanged by 99,900 later steps
    assert len(at_100k) == 100_000 and at_100k[-1] == (100_000, 1e-5, 1.2e-5)
    assert at_100k._points is at_100._points  # no copy per step: one list, two lengths
    assert "polyline" in loss_chart_svg(at_100k, 100_000)
