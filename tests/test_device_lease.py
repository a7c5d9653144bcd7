"""One owner per device: a training run holds its device; Try it and the regularisation images are refused
meanwhile (on a GPU both would not fit); a run waits for an image job; the CPU's thread count is the holder's."""
from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from app import dataset_actions  # noqa: E402
from app import tab_tryit  # noqa: E402
from test_train import images  # noqa: E402,F401  (fixture)
from app.run_manager import RunManager  # noqa: E402
from app.tab_common import ImageModels  # noqa: E402
from trainer import device_lease  # noqa: E402
from trainer.device_lease import TRAINING, TRY_IT, DeviceBusy, DeviceLeases  # noqa: E402
from trainer.events import Finished, Memory, Started, Step  # noqa: E402

BUSY = "a training run is using the CPU; wait for it or stop it"


def test_a_held_device_refuses_other_threads_and_is_free_again_after():
    leases = DeviceLeases()
    refusals: list[str] = []
    with leases.take("cuda", TRAINING):
        assert leases.holder("cuda:0") == TRAINING and leases.holder("cpu") is None
        with leases.take("cuda:0", TRAINING):  # the same thread again: re-entrant
            pass
        other = threading.Thread(target=lambda: _try(leases, "cuda:0", refusals))
        other.start()
        other.join()
        with leases.take("cuda:1", TRY_IT):  # another GPU is another device
            assert leases.holder("cuda:1") == TRY_IT
    assert refusals == ["a training run is using the GPU; wait for it or stop it"]
    assert leases.holder("cuda") is None
    with leases.take("cuda", TRY_IT):  # free again
        pass


def _try(leases: DeviceLeases, device: str, refusals: list[str]) -> None:
    try:
        leases.take(device, TRY_IT).release()
    except DeviceBusy as busy:
        refusals.append(str(busy))


def test_a_run_waits_for_an_image_job_and_says_so():
    leases = DeviceLeases()
    job = leases.take("cpu", TRY_IT)
    said: list[str] = []
    got = threading.Event()
    run = threading.Thread(target=lambda: (leases.take("cpu", TRAINING, wait_log=said.append), got.set()))
    run.start()
    time.sleep(0.2)
    assert not got.is_set() and said == ["waiting for Try it to finish with the CPU"]
    job.release()
    assert got.wait(5) and leases.holder("cpu") == TRAINING


def test_a_cpu_run_sets_its_thread_count_while_it_holds_the_cpu():
    leases, before = DeviceLeases(), torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    lease = leases.take("cpu", TRAINING, cpu_threads=wanted)
    assert torch.get_num_threads() == wanted
    lease.release()
    lease.release()  # twice: harmless
    assert torch.get_num_threads() == before and leases.holder("cpu") is None


# -- through the GUI's handlers, while a RunManager run is going -----------------------------------
def lease_holding_trainer(holding: threading.Event, finish: threading.Event):
    """A stand-in for trainer.loop.train that holds the CPU as a CPU run does, until ``finish``."""

    def train(settings, sink, control):
        with device_lease.take("cpu", TRAINING):
            sink(Started(total_steps=1, total_epochs=1, steps_per_epoch=1, plan="1 step", device="cpu"))
            holding.set()
            finish.wait(30)
            sink(Step(1, 1, 1, 1, loss=0.5, avg_loss=0.5, lr=1e-4, lrs={"unet": 1e-4}, it_per_s=1.0, elapsed_s=1.0,
                      eta_s=0.0, memory=Memory(device="cpu", rss_mb=1.0)))
            sink(Finished(1, ()))

    return train


@pytest.fixture
def running():
    holding, finish = threading.Event(), threading.Event()
    runs = RunManager(lease_holding_trainer(holding, finish))
    assert runs.start(SimpleNamespace(output_name="unit"))[0]
    assert holding.wait(10)
    yield runs, finish
    finish.set()
    assert runs.wait(10)


def tryit_values(model) -> dict:
    return dict(base_model=str(model), lora="", weight=0.8, prompt="photo of sks dog", negative_prompt="", width=64,
                height=64, steps=1, cfg_scale=5.0, seed=11, count=1, sampler="euler",
                compare_with=tab_tryit.COMPARE_FILES, lora_b="", weight_b=0.8)


def test_try_it_is_refused_while_a_run_holds_the_device_and_works_after(running, tiny_sd1_dir):
    runs, finish = running
    models = ImageModels(device="cpu")
    items, note, _ = tab_tryit.generate_images(models, tryit_values(tiny_sd1_dir), {})
    assert items == [] and "Not generated" in note and BUSY in note and "nk-error" in note
    assert not models.loaded  # refused before loading a model next to the run's
    finish.set()
    assert runs.wait(10) and device_lease.holder("cpu") is None
    items, note, _ = tab_tryit.generate_images(models, tryit_values(tiny_sd1_dir), {})
    assert len(items) == 1 and "1 image(s)" in note


def test_reg_images_are_refused_while_a_run_holds_the_device(running, tiny_sd1_dir, tmp_path):
    values = dict(folder=str(tmp_path / "reg"), class_prompt="photo of a dog", total=2, width=64, height=64,
                  steps=1, sampler="euler")
    status = dataset_actions.generate_reg(ImageModels(device="cpu"), str(tiny_sd1_dir), values, {})
    assert "Not generated" in status and BUSY in status
    assert not list((tmp_path / "reg").rglob("*.png"))


# -- the real trainer --------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_waits_for_try_it_then_holds_the_device_to_its_end(tiny_sd1_dir, images, tmp_path):
    from test_train import tiny_settings
    from trainer.events import Log
    from trainer.loop import train

    seen: list[tuple[str, str | None]] = []
    waiting = threading.Event()

    def sink(event) -> None:
        if isinstance(event, Log) and event.message.startswith("waiting for"):
            waiting.set()
        seen.append((type(event).__name__, device_lease.holder("cpu")))

    job = device_lease.take("cpu", TRY_IT)
    result: list = []
    run = threading.Thread(target=lambda: result.append(
        train(tiny_settings(tiny_sd1_dir, images, tmp_path, num_cpu_threads_per_process=1), sink)))
    run.start()
    assert waiting.wait(60)  # the run waits for Try it's image to finish ...
    job.release()
    run.join(120)
    assert result and result[0].status == "finished", result
    assert ("Started", TRAINING) in seen and ("Finished", TRAINING) in seen  # ... then owns the CPU to its end
    assert device_lease.holder("cpu") is None


def test_the_first_lease_switches_tf32_on_for_the_process_once(monkeypatch):
    from trainer import process_setup

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(process_setup, "_applied", False)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        DeviceLeases().take("cpu", TRY_IT).release()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # what a script chose afterwards stays: runs never reset it
        DeviceLeases().take("cuda", TRAINING).release()
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
