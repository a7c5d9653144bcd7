"""Pause and resume: the run waits at a step boundary with everything loaded, resumes where it was, and
gives the same LoRA as a run that never paused; Stop while paused stops and saves; paused time is not
counted in it/s or the ETA."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from test_train import Recorder, images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer import events as ev
from trainer.control import Control
from trainer.loop import train
from trainer.state import ProgressMeter


def fake_run(sink):
    """What Control needs of a run, without a model."""
    return SimpleNamespace(sink=sink, step=5, meter=ProgressMeter(10), device=torch.device("cpu"), family=None,
                           network=torch.nn.Linear(2, 2), stepper=SimpleNamespace(optimizer=None))


def hold_in_thread(control, run):
    result = {}
    thread = threading.Thread(target=lambda: result.update(stop=control.between_steps(run)))
    thread.start()
    return thread, result


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_no_pause_asked_passes_straight_through():
    control = Control()
    assert control.between_steps(fake_run(Recorder())) is False
    control.request_stop()
    assert control.between_steps(fake_run(Recorder())) is True


def test_pause_waits_until_resume_and_leaves_the_pause_out_of_the_speed():
    control, rec = Control(), Recorder()
    run = fake_run(rec)
    control.request_pause()
    thread, result = hold_in_thread(control, run)
    wait_for(lambda: rec.of(ev.Paused))
    time.sleep(0.2)
    assert thread.is_alive() and not rec.of(ev.Resumed)
    started = run.meter.started
    control.request_resume()
    thread.join(5)
    assert result == {"stop": False} and not control.pause_requested
    (paused,), (resumed,) = rec.of(ev.Paused), rec.of(ev.Resumed)
    assert paused.step == 5 and not paused.freed_memory and "stay loaded" in paused.note
    assert resumed.paused_s >= 0.2 and run.meter.started >= started + 0.2  # left out of elapsed and speed
    run.meter.record(1.0)
    assert run.meter.it_per_s() > 20  # the step after the pause took no time of its own


def test_save_now_while_paused_writes_the_lora_and_stays_paused():
    """Save the LoRA now works during a pause, so Try it can load the paused run's current LoRA."""
    control, rec = Control(), Recorder()
    saved = []
    run = fake_run(rec)
    run.epoch = 2
    run.outputs = SimpleNamespace(save=lambda kind, step, epoch: saved.append((kind, step, epoch)))
    control.request_pause()
    thread, _ = hold_in_thread(control, run)
    wait_for(lambda: rec.of(ev.Paused))
    control.request_save()
    wait_for(lambda: saved)
    assert saved == [("step", 5, 2)] and thread.is_alive() and not control.take_save_request()
    control.request_resume()
    thread.join(5)
    assert not thread.is_alive() and len(rec.of(ev.Resumed)) == 1


def test_stop_while_paused_stops():
    control, rec = Control(), Recorder()
    control.request_pause()
    thread, result = hold_in_thread(control, fake_run(rec))
    wait_for(lambda: rec.of(ev.Paused))
    control.request_stop()
    thread.join(5)
    assert result == {"stop": True} and len(rec.of(ev.Resumed)) == 1


def test_freeing_memory_on_a_cpu_is_a_no_op_that_says_so():
    control, rec = Control(), Recorder()
    control.request_pause()
    thread, _ = hold_in_thread(control, fake_run(rec))
    wait_for(lambda: rec.of(ev.Paused))
    control.request_pause(free_memory=True)  # the second choice, while already paused
    wait_for(lambda: len(rec.of(ev.Paused)) == 2)
    freed = rec.of(ev.Paused)[1]
    assert not freed.freed_memory and "CPU" in freed.note and "no GPU memory" in freed.note
    control.request_resume()
    thread.join(5)
    assert not thread.is_alive()


@pytest.mark.slow
def test_pause_then_resume_gives_the_lora_of_an_uninterrupted_run(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    common = dict(epoch=2, lr_scheduler="cosine", network_dropout=0.1)  # RNG and schedule both in play
    straight = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "a", **common))
    control, rec = Control(), Recorder()

    def sink(event):  # asked on the training thread at step 1: the pause holds at the step-1 boundary
        rec(event)
        if isinstance(event, ev.Step) and event.step == 1:
            control.request_pause(free_memory=True)
        if isinstance(event, ev.Paused):
            threading.Timer(0.3, control.request_resume).start()

    paused = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "b", **common), sink, control)
    assert straight.status == paused.status == "finished" and paused.step == 4, paused.error
    assert [e.step for e in rec.of(ev.Paused)] == [1] and rec.of(ev.Resumed)[0].paused_s >= 0.3
    assert rec.of(ev.Paused)[0].freed_memory == torch.cuda.is_available()  # on a GPU the weights went to the CPU
    kinds = [type(e).__name__ for e in rec.events if isinstance(e, (ev.Step, ev.Paused, ev.Resumed))]
    assert kinds[:4] == ["Step", "Paused", "Resumed", "Step"]
    a, b = load_file(straight.files[-1]), load_file(paused.files[-1])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_stop_while_paused_saves_as_a_stop_does(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    control = Control()

    def sink(event):
        if isinstance(event, ev.Step) and event.step == 1:
            control.request_pause()
        if isinstance(event, ev.Paused):
            threading.Timer(0.1, control.request_stop).start()

    stopped = train(tiny_settings(tiny_sd1_dir, images, tmp_path, epoch=2), sink, control)
    assert stopped.status == "stopped" and stopped.step == 1
    assert [p.rsplit("/", 1)[-1] for p in stopped.files] == ["tiny-step00000001.safetensors"]


# -- the GUI's run manager and live panel, with a scripted trainer on the same Control contract ----------
def paced_trainer(total=6):
    """Emits the real events; waits at each step boundary as trainer.loop does (Control.between_steps)."""

    def train_fn(settings, sink, control):
        run = fake_run(sink)
        sink(ev.Started(total_steps=total, total_epochs=1, steps_per_epoch=total, plan="6 steps", device="cpu"))
        for step in range(1, total + 1):
            run.step = step
            sink(ev.Step(step, total, 1, 1, loss=0.5, avg_loss=0.5, lr=1e-4, lrs={"unet": 1e-4}, it_per_s=10.0,
                         elapsed_s=0.1 * step, eta_s=0.1 * (total - step), memory=ev.Memory("cpu", 100.0)))
            time.sleep(0.02)
            if control.between_steps(run):
                sink(ev.Stopped(step))
                return
        sink(ev.Finished(total))

    return train_fn


def test_the_gui_pauses_shows_where_and_resumes():
    from app.live_panel import render_live
    from app.run_manager import RunManager
    from app.run_panel import NOTHING_SHOWN, refresh

    runs = RunManager(paced_trainer())
    assert runs.pause() == "No training is running."
    runs.start(SimpleNamespace(output_name="unit"))
    assert "model stays loaded" in runs.pause()
    wait_for(lambda: runs.snapshot().status == "paused")
    snap = runs.snapshot()
    page = render_live(snap)
    assert f"Paused at step {snap.paused.step}" in page and "stay loaded" in page and ">paused<" in page
    assert refresh(snap, NOTHING_SHOWN).pause_buttons == (False, True)
    assert "weights move to the CPU" in runs.pause(free_memory=True)
    wait_for(lambda: "no GPU memory" in runs.snapshot().paused.note)
    assert runs.resume() == "Resuming."
    assert runs.wait(10) and runs.snapshot().status == "finished"
    assert any("Resumed at step" in line for line in runs.snapshot().log)
    assert runs.resume() == "No training is running."


def test_stop_while_paused_in_the_gui_stops():
    from app.run_manager import RunManager

    runs = RunManager(paced_trainer())
    runs.start(SimpleNamespace(output_name="unit"))
    runs.pause()
    wait_for(lambda: runs.snapshot().status == "paused")
    runs.stop()
    assert runs.wait(10) and runs.snapshot().status == "stopped"
