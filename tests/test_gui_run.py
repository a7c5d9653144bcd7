"""Run manager and live panel as plain Python, with a scripted trainer that emits the real event types.
(The browser tests run the real trainer.)"""
from __future__ import annotations

import logging
import re
import threading
import time
from types import SimpleNamespace

import pytest

from app.live_panel import (LOG_TAIL, format_duration, loss_chart_svg, memory_cell, render_live, render_run_output,
                            sample_gallery)
from app.run_manager import RunManager, RunSnapshot
from app.run_panel import NOTHING_SHOWN, message_html, refresh, start_request
from trainer.events import EpochEnd, Error, Finished, Log, Memory, Sample, Saved, Started, Step, Stopped

SETTINGS = SimpleNamespace(output_name="unit")


def scripted_trainer(total=6, step_delay=0.0, gate: threading.Event | None = None, fail: Exception | None = None):
    """A stand-in for trainer.loop.train: the same event sequence, on the same control contract."""

    def train(settings, sink, control):
        sink(Started(total_steps=total, total_epochs=1, steps_per_epoch=total, plan=f"{total} steps", device="cpu"))
        for step in range(1, total + 1):
            if gate is not None:
                gate.wait(5)
            if fail is not None and step == 3:
                raise fail
            mem = Memory(device="cpu", rss_mb=512.0)
            sink(Step(step, total, 1, 1, loss=1.0 / step, avg_loss=1.2 / step, lr=1e-4, lrs={"unet": 1e-4},
                      it_per_s=10.0, elapsed_s=step * 0.1, eta_s=(total - step) * 0.1, memory=mem))
            time.sleep(step_delay)
            if control.stop_requested:
                path = f"/out/{settings.output_name}-step{step:08d}.safetensors"
                sink(Saved(path, "stopped", step, 1))
                sink(Stopped(step, (path,)))
                return
        sink(EpochEnd(1, 1, avg_loss=0.5))
        path = f"/out/{settings.output_name}.safetensors"
        sink(Saved(path, "final", total, 1))
        sink(Finished(total, (path,)))

    return train


def test_a_run_is_followed_to_the_end():
    runs = RunManager(scripted_trainer(total=6))
    assert runs.start(SETTINGS) == (True, "Training started.")
    assert runs.wait(10)
    snap = runs.snapshot()
    assert snap.status == "finished" and snap.progress == 1.0 and snap.step == 6
    assert [s for s, _, _ in snap.losses] == [1, 2, 3, 4, 5, 6]
    assert [s.path for s in snap.saved] == ["/out/unit.safetensors"]
    assert snap.ended_at is not None and snap.memory.rss_mb == 512.0


def test_a_second_start_is_refused_while_a_run_is_going():
    gate = threading.Event()
    runs = RunManager(scripted_trainer(total=3, gate=gate))
    assert runs.start(SETTINGS)[0]
    started, message = runs.start(SETTINGS)
    assert not started and "already going" in message
    gate.set()
    assert runs.wait(10) and runs.snapshot().run_id == 1
    assert runs.start(SETTINGS)[0] and runs.wait(10)
    assert runs.snapshot().run_id == 2


def test_stop_ends_the_run_and_lists_the_saved_file():
    gate = threading.Event()
    runs = RunManager(scripted_trainer(total=50, gate=gate))
    runs.start(SETTINGS)
    assert "Stopping" in runs.stop()
    assert runs.snapshot().status == "stopping"
    gate.set()
    assert runs.wait(10)
    snap = runs.snapshot()
    assert snap.status == "stopped" and snap.step < 50
    assert snap.saved[-1].kind == "stopped" and snap.saved[-1].path.endswith(f"step{snap.step:08d}.safetensors")
    assert runs.stop() == "No training is running."


def test_a_crash_in_the_trainer_becomes_an_error_on_the_page():
    runs = RunManager(scripted_trainer(total=5, fail=RuntimeError("CUDA out of memory")))
    runs.start(SETTINGS)
    assert runs.wait(10)
    snap = runs.snapshot()
    assert snap.status == "error" and "CUDA out of memory" in snap.error.message
    page = render_live(snap)
    assert "Training failed" in page and "CUDA out of memory" in page and 'data-status="error"' in page


def test_a_trainer_error_event_names_the_field_to_fix():
    def train(settings, sink, control):
        sink(Error("no images found in the image folder", field="train_data_dir", hint="point it at the parent folder"))

    runs = RunManager(train)
    runs.start(SETTINGS)
    runs.wait(10)
    page = render_live(runs.snapshot())
    assert "Fix: Folders › Image folder" in page and "point it at the parent folder" in page


def test_warnings_logged_on_the_training_thread_reach_the_log_tail():
    def train(settings, sink, control):
        logging.getLogger("diffusers.some_module").warning("slow attention fallback")
        sink(Log("cached 7 latents"))
        sink(Finished(0))

    runs = RunManager(train)
    runs.start(SETTINGS)
    runs.wait(10)
    log = runs.snapshot().log
    assert any("slow attention fallback" in line for line in log) and "cached 7 latents" in log


def test_live_panel_shows_progress_speed_chart_and_files():
    runs = RunManager(scripted_trainer(total=4))
    runs.start(SETTINGS)
    runs.wait(10)
    page = render_live(runs.snapshot())
    assert "100% · step 4 / 4" in page and "10.00 it/s" in page and "512 MiB" in page
    points = re.findall(r'<polyline points="([^"]+)" class="nk-line-avg"', page)
    assert len(points) == 1 and len(points[0].split()) == 4
    assert "Finished" in page and "unit.safetensors" in render_run_output(runs.snapshot())


def test_idle_page_says_what_to_do():
    assert "Start training" in render_live(RunSnapshot())


def test_chart_scales_and_thins_long_runs():
    losses = tuple((s, 1.0 + (s % 7) / 10, 1.2) for s in range(1, 5001))
    svg = loss_chart_svg(losses, 5000)
    raw = re.search(r'<polyline points="([^"]+)" class="nk-line-raw"', svg).group(1).split()
    assert 300 <= len(raw) <= 401
    xs = [float(p.split(",")[0]) for p in raw]
    assert xs == sorted(xs) and xs[-1] == pytest.approx(640 - 12)  # ends at the newest step, right edge
    assert "waiting for the first step" in loss_chart_svg((), 10)


def test_memory_and_duration_formats():
    cuda = Memory(device="cuda:0", rss_mb=3000, allocated_mb=5120, reserved_mb=6144, total_mb=24576)
    assert memory_cell(cuda) == ("GPU memory", "5.00 GiB allocated · 6.00 GiB reserved of 24.00 GiB")
    assert memory_cell(Memory(device="cpu", rss_mb=2048)) == ("RAM", "2.00 GiB")
    assert memory_cell(None) == ("Memory", "–")
    assert (format_duration(59), format_duration(3725), format_duration(None)) == ("0:59", "1:02:05", "–")


def test_samples_become_gallery_items_newest_first(tmp_path):
    from PIL import Image

    paths = []
    for i in range(2):
        path = tmp_path / f"s{i}.png"
        Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(path)
        paths.append(str(path))
    snap = RunSnapshot(samples=(Sample(paths[0], "a cat", 5, 1), Sample(paths[1], "a dog", 10, 1), Sample(str(tmp_path / "gone.png"), "x", 11, 1)))
    items = sample_gallery(snap)
    assert [caption for _, caption in items] == ["step 10 · a dog", "step 5 · a cat"]
    assert items[0][0].getpixel((0, 0)) == (100, 0, 0)


# ---- Start, the page's poll and what they show (the handlers behind the run column) ------------------


@pytest.fixture
def valid_form(tiny_sd1_dir, image_folder, tmp_path):
    """Widget values of a form that passes the check (a tiny model and image folder)."""
    from app.form import form_values
    from trainer.settings import TrainingSettings

    values = form_values(TrainingSettings())
    values.update(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(image_folder),
                  output_dir=str(tmp_path / "out"), output_name="unit", max_resolution="64,64", mixed_precision="no")
    return values


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_double_click_on_start_starts_one_run_and_shows_no_error(valid_form):
    gate = threading.Event()
    runs = RunManager(scripted_trainer(total=3, gate=gate))
    first = start_request(runs, valid_form, {}, page_run=0)
    assert "Training started." in first.message and "nk-run-ok" in first.message
    assert first.page_run == 1 and first.start_enabled is False  # Start greys out at once
    second = start_request(runs, valid_form, {}, page_run=first.page_run)  # the same page's second click
    assert second.message is None and second.plan is None and second.start_enabled is False
    wait_until(lambda: runs.snapshot().total_steps == 3)
    other_page = start_request(runs, valid_form, {}, page_run=0)  # Start pressed on another page
    assert "nk-run-info" in other_page.message and "nk-run-refused" not in other_page.message
    assert "already going (at step 0 / 3)" in other_page.message
    gate.set()
    assert runs.wait(10) and runs.snapshot().run_id == 1  # one run only


def test_another_page_pressing_start_before_the_first_step_is_told_it_is_starting():
    gate = threading.Event()

    def slow_start(settings, sink, control):
        gate.wait(5)  # the trainer has not said Started yet: no step count to show
        sink(Finished(0))

    runs = RunManager(slow_start)
    runs.start(SETTINGS)
    other_page = start_request(runs, {}, {}, page_run=0)
    assert "already going (starting)" in other_page.message and "0/0" not in other_page.message
    gate.set()
    assert runs.wait(10)


def test_start_refused_by_the_check_keeps_start_enabled_and_shows_the_problems(valid_form):
    runs = RunManager(scripted_trainer())
    reply = start_request(runs, {**valid_form, "train_data_dir": ""}, {}, page_run=0)
    assert "Not started" in reply.message and "Image folder" in reply.message and "Image folder" in reply.plan
    assert reply.start_enabled is None and not runs.busy


def test_the_poll_disables_start_during_a_run_and_replaces_training_started_with_how_it_ended():
    gate = threading.Event()
    runs = RunManager(scripted_trainer(total=4, gate=gate))
    idle = refresh(runs.snapshot(), NOTHING_SHOWN)
    assert idle.start_enabled is True and idle.message is None
    runs.start(SETTINGS)
    wait_until(lambda: runs.snapshot().status == "running")
    going = refresh(runs.snapshot(), idle.shown)
    assert going.start_enabled is False and going.message is None
    gate.set()
    assert runs.wait(10)
    ended = refresh(runs.snapshot(), going.shown)
    assert ended.start_enabled is True
    assert "Finished at step 4 / 4. Saved unit.safetensors." in ended.message and "nk-run-ok" in ended.message
    later = refresh(runs.snapshot(), ended.shown)
    assert later.message is None and later.start_enabled is None and later.live is None  # said once


def test_a_run_that_ended_between_two_polls_still_replaces_the_message():
    runs = RunManager(scripted_trainer(total=2))
    before = refresh(runs.snapshot(), NOTHING_SHOWN)
    runs.start(SETTINGS)
    assert runs.wait(10)
    ended = refresh(runs.snapshot(), before.shown)
    assert "Finished at step 2 / 2" in ended.message
    assert ended.start_enabled is True  # greyed by the click, never seen going: Start comes back all the same
    reopened = refresh(runs.snapshot(), NOTHING_SHOWN)  # a page opened after the run: nothing to announce
    assert reopened.message is None and reopened.start_enabled is True


def stopped_run():
    """A run a page saw going, then stopped: (the manager, what the page showed, Stop's reply)."""
    gate = threading.Event()
    runs = RunManager(scripted_trainer(total=50, gate=gate))
    runs.start(SETTINGS)
    wait_until(lambda: runs.snapshot().status == "running")
    going = refresh(runs.snapshot(), NOTHING_SHOWN)
    stop_reply = message_html(runs.stop())
    gate.set()
    assert runs.wait(10)
    return runs, going, stop_reply


def test_a_stop_reply_that_lands_after_the_end_is_replaced_by_how_the_run_ended():
    runs, going, stop_reply = stopped_run()
    announced = refresh(runs.snapshot(), going.shown)
    assert "Stopped at step" in announced.message
    # the page then applied Stop's reply over it: the next poll announces the end again, once
    again = refresh(runs.snapshot(), announced.shown, stop_reply)
    assert "Stopped at step" in again.message
    assert refresh(runs.snapshot(), again.shown, again.message).message is None


def test_stopped_and_failed_runs_end_with_their_own_message():
    runs, going, _ = stopped_run()
    stopped = refresh(runs.snapshot(), going.shown).message
    assert re.search(r"Stopped at step \d+ / 50\. Saved unit-step\d+\.safetensors\.", stopped) and "nk-run-info" in stopped

    runs = RunManager(scripted_trainer(total=5, fail=RuntimeError("CUDA out of memory")))
    runs.start(SETTINGS)
    assert runs.wait(10)
    failed = refresh(runs.snapshot(), going.shown).message
    assert "Failed at step 2: RuntimeError: CUDA out of memory" in failed and "nk-run-refused" in failed


def test_the_log_tail_shows_whole_lines_from_a_line_start_newest_last():
    entries = tuple(f"entry {i}: first line\nentry {i}: second line" for i in range(LOG_TAIL))
    page = render_run_output(RunSnapshot(run_id=1, status="running", log=entries))
    box = re.search(r'<div class="nk-logbox" id="nk-log">(.*?)</div></details>', page).group(1)
    rows = re.findall(r"<div>(.*?)</div>", box)[::-1]  # reversed in the box (column-reverse): reading order
    assert len(rows) == LOG_TAIL and all("\n" not in row for row in rows)  # one line per row
    assert rows[0] == f"entry {LOG_TAIL // 2}: first line"  # cut at a line break: the tail starts at a line's start
    assert rows[-1] == f"entry {LOG_TAIL - 1}: second line"


def test_chart_gridlines_sit_at_round_values_clear_of_the_curve():
    losses = tuple((s, 0.0556 + 1.2 / s, 0.06 + 1.2 / s) for s in range(1, 41))
    svg = loss_chart_svg(losses, 40)
    labels = sorted(float(v) for v in re.findall(r'class="nk-axis">(-?[\d.]+)</text>', svg))
    steps = {round(b - a, 9) for a, b in zip(labels, labels[1:])}
    assert len(labels) >= 3 and len(steps) == 1  # evenly spaced
    step = steps.pop()
    assert step in (0.1, 0.2, 0.25, 0.5, 1.0) and all(abs(v / step - round(v / step)) < 1e-9 for v in labels)
    assert min(labels) >= 0  # a loss is never negative: neither is the axis
    grid_ys = [float(y) for y in re.findall(r'y1="([\d.]+)" y2="[\d.]+" class="nk-grid"', svg)]
    curve_ys = [float(p.split(",")[1]) for p in re.search(r'points="([^"]+)" class="nk-line-raw"', svg).group(1).split()]
    assert max(grid_ys) - max(curve_ys) >= 6  # the lowest gridline lies clearly below the curve's minimum
    assert min(abs(g - max(curve_ys)) for g in grid_ys) >= 3  # and no gridline runs along it


def test_galleries_show_small_images_at_their_own_size(tmp_path):
    """Samples and Try it images: a 64 px image is drawn at 64 px, not stretched to the gallery's width."""
    from gui_app_support import component, fresh_app

    demo = fresh_app(tmp_path)
    assert {component(demo, key).object_fit for key in ("samples_gallery", "tryit_gallery")} == {"scale-down"}
