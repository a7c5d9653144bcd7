"""Data-parallel runs on torch.distributed: two CPU processes over gloo, started as the GUI and the CLI start
them (torchrun), against one process with their batches together."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from test_gui_browser import free_port
from test_train import Recorder, tiny_settings
from trainer import events as ev
from trainer.control import Control
from trainer.data.dataset import DatasetConfig, TrainingDataset
from trainer.distributed.rules import LaunchArgsError, parse_gpu_ids, torchrun_extra_args
from trainer.distributed.wire import from_line, to_line
from trainer.loop import train
from trainer.preflight import check
from trainer.settings import save_settings

REPO = Path(__file__).resolve().parent.parent


# ---- rules, shares and the wire (no processes) -------------------------------------------------

def test_gpu_ids_and_extra_launch_arguments_map_onto_torchrun():
    assert parse_gpu_ids(" 0, 2 ") == (0, 2) and parse_gpu_ids("") == ()
    with pytest.raises(LaunchArgsError, match="'a' is not a GPU number"):
        parse_gpu_ids("0,a")
    assert torchrun_extra_args("--machine_rank 1 --main_process_ip=10.0.0.2 --same_network") == \
        ["--node_rank", "1", "--master_addr", "10.0.0.2"]
    with pytest.raises(LaunchArgsError, match="--num_processes is the setting num_processes"):
        torchrun_extra_args("--num_processes 4")
    with pytest.raises(LaunchArgsError, match="--deepspeed_config_file has no torchrun equivalent"):
        torchrun_extra_args("--deepspeed_config_file ds.json")


def _dataset(entries, processes, rank, batch):
    return TrainingDataset(entries, DatasetConfig(batch_size=batch, seed=7, processes=processes, rank=rank))


def test_each_steps_batch_is_split_between_the_ranks(tmp_path):
    from trainer.data.plan import plan_steps
    from trainer.devtools.synthetic import make_image_folder

    images = make_image_folder(tmp_path / "img", {"3_a": 3}, sizes=[(64, 64)], seed=1)  # 9 samples: a last batch of 1
    entries = plan_steps(tiny_settings(tmp_path, images, tmp_path / "out", train_batch_size=2)).entries
    single = _dataset(entries, 1, 0, 2)
    ranks = [_dataset(entries, 2, rank, 1) for rank in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 5
    for epoch in (1, 2):
        batches = list(single.iter_epoch(epoch))
        shares = [list(r.iter_epoch(epoch)) for r in ranks]
        for step, whole in enumerate(batches):
            parts = [share[step] for share in shares]
            real = [(p, k, float(w)) for part in parts for p, k, w in zip(part.paths, part.row_keys, part.loss_weights)
                    if w > 0]
            assert [(p, k) for p, k, _ in real] == list(zip(whole.paths, whole.row_keys))  # the union, in order
            if len(whole) == 2:
                assert [w for *_, w in real] == [1.0, 1.0]
            else:  # the last batch of one: rank 1 trains rank 0's sample with weight 0, rank 0 counts twice
                assert [float(w) for w in parts[1].loss_weights] == [0.0] and [w for *_, w in real] == [2.0]


def test_a_share_emptied_by_a_bad_image_trains_a_stand_in_with_weight_0(tmp_path):
    from trainer.data.plan import plan_steps
    from trainer.devtools.synthetic import make_image_folder

    images = make_image_folder(tmp_path / "img", {"1_a": 2}, sizes=[(64, 64)], seed=1)
    entries = plan_steps(tiny_settings(tmp_path, images, tmp_path / "out")).entries
    ranks = [_dataset(entries, 2, rank, 1) for rank in (0, 1)]
    members = ranks[0].epoch_batches(1)[0]
    bad = entries[members[1]].item.path  # rank 1's only sample breaks after the plan was made
    bad.write_bytes(b"not an image")
    first, second = (next(iter(r.iter_epoch(1))) for r in ranks)
    # rank 0 cannot know that rank 1's image failed: its share keeps its weight, the bad slot counts as 0
    assert first.paths == [entries[members[0]].item.path] and float(first.loss_weights[0]) == 1.0
    assert second.paths == first.paths and float(second.loss_weights[0]) == 0.0  # both take part in the step
    assert [e.path for e in second.bad_images] == [bad]


def test_the_check_counts_gpus_ids_and_nccl(tmp_path, tiny_sd1_dir, image_folder, monkeypatch):
    from trainer.preflight import device as device_module, processes
    from trainer.preflight.device import DeviceInfo

    gpus = DeviceInfo("cuda", "GPU", 24 * 2**30, 24 * 2**30, "test", gpu_count=2)
    monkeypatch.setattr(device_module, "probe_device", lambda: gpus)
    monkeypatch.setattr(processes, "_nccl_available", lambda: False)

    def problems(**overrides):
        values = {"num_processes": 2, "main_process_port": free_port(), **overrides}
        report = check(tiny_settings(tiny_sd1_dir, image_folder, tmp_path, **values), deep=False)
        return {(p.severity, p.field): p.message for p in report.problems if p.field in
                ("num_processes", "gpu_ids", "multi_gpu", "main_process_port")}

    fine = problems()
    assert ("error", "num_processes") not in fine and ("error", "gpu_ids") not in fine
    assert "NCCL is not available" in fine[("warning", "multi_gpu")]
    assert "need a GPU each, but this machine has 2" in problems(num_processes=3)[("error", "num_processes")]
    assert "names GPU 5, but this machine has 2" in problems(gpu_ids="0,5")[("error", "gpu_ids")]
    assert "lists 1 GPUs but 2 processes" in problems(gpu_ids="1")[("error", "gpu_ids")]


def test_step_events_cross_processes_with_every_ranks_memory():
    step = ev.Step(3, 10, 1, 2, 0.5, 0.6, 1e-4, {"unet": 1e-4}, 2.0, 1.5, 5.0, ev.Memory("cuda:0", 900.0, 1.0, 2.0),
                   (ev.Memory("cuda (rank 0)", 900.0, 1.0), ev.Memory("cuda (rank 1)", 800.0, 1.5)))
    assert from_line(to_line(step)) == step
    assert from_line(to_line(ev.Finished(4, ("a.safetensors",)))) == ev.Finished(4, ("a.safetensors",))


def test_the_check_names_processes_ports_machines_and_arguments(tmp_path, tiny_sd1_dir, image_folder):
    base = dict(num_processes=2, num_cpu_threads_per_process=1)
    report = check(tiny_settings(tiny_sd1_dir, image_folder, tmp_path, **base), deep=False)
    notes = " ".join(p.message for p in report.problems if p.field == "num_processes")
    assert "each step trains 2 samples (1 per process)" in notes and "over gloo" in notes
    from trainer.data.plan import plan_steps

    assert "÷ batch 2 (1 per process × 2 processes)" in plan_steps(tiny_settings(tiny_sd1_dir, image_folder, tmp_path,
                                                                                 **base)).formula
    with socket_bound() as port:
        busy = check(tiny_settings(tiny_sd1_dir, image_folder, tmp_path, main_process_port=port, **base), deep=False)
        assert any(p.field == "main_process_port" and f"port {port} is in use" in p.message for p in busy.errors)
    machines = check(tiny_settings(tiny_sd1_dir, image_folder, tmp_path, num_machines=2, **base), deep=False)
    error = next(p for p in machines.errors if p.field == "num_machines")
    assert "torchrun --nnodes 2 --nproc_per_node 1 --node_rank R" in error.fix
    bad = check(tiny_settings(tiny_sd1_dir, image_folder, tmp_path, extra_accelerate_launch_args="--fsdp", **base),
                deep=False)
    assert any(p.field == "extra_accelerate_launch_args" and "--fsdp" in p.message for p in bad.errors)
    odd = check(tiny_settings(tiny_sd1_dir, image_folder, tmp_path, num_processes=3, num_machines=2), deep=False)
    assert any(p.field == "num_processes" and "divide evenly" in p.message for p in odd.errors)


def test_a_group_that_cannot_start_says_why_before_any_process_starts(tmp_path, tiny_sd1_dir, image_folder):
    recorder = Recorder()
    with socket_bound() as port:
        result = train(tiny_settings(tiny_sd1_dir, image_folder, tmp_path, num_processes=2, main_process_port=port),
                       recorder)
    assert result.status == "failed" and result.field == "main_process_port"
    assert f"port {port} is in use" in result.error and "process rank" not in result.error
    assert [type(e) for e in recorder.events] == [ev.Error] and not _workers()


def test_on_a_cpu_the_memory_check_counts_every_process(tmp_path, tiny_sd1_dir, image_folder, monkeypatch):
    from trainer.families.registry import spec_for_settings
    from trainer.preflight import device as device_module
    from trainer.preflight.device import DeviceInfo
    from trainer.preflight.memory import estimate_memory

    settings = tiny_settings(tiny_sd1_dir, image_folder, tmp_path, main_process_port=free_port())
    one = estimate_memory(settings, spec_for_settings(settings), DeviceInfo("cpu", "CPU", None, None, "test")).total_bytes
    cpu = DeviceInfo("cpu", "CPU", int(one * 1.5), int(one * 1.5), "test")
    monkeypatch.setattr(device_module, "probe_device", lambda: cpu)

    def memory_warnings(processes):
        report = check(settings.model_copy(update={"num_processes": processes}), deep=False)
        return [p.message for p in report.problems if p.severity == "warning" and "GiB" in p.message]

    assert memory_warnings(1) == []
    (warning,) = memory_warnings(2)
    assert "(2 processes × " in warning and "more than this computer's memory" in warning


class socket_bound:
    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


# ---- groups of two CPU processes -----------------------------------------------------------------

def _group_settings(model, images, out, **overrides):
    values = dict(num_processes=2, num_cpu_threads_per_process=1, main_process_port=free_port(), epoch=2)
    values.update(overrides)
    return tiny_settings(model, images, out, **values)


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    from trainer.devtools.synthetic import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("dist_images") / "img", {"1_sks dog": 4}, sizes=[(64, 64)], seed=3)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / (a.float().norm() + 1e-12)).item()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["SGDNesterov", "AdamW"])
def test_two_processes_with_batch_1_train_the_lora_of_one_process_with_batch_2(optimizer, tiny_sd1_dir, four_images,
                                                                               tmp_path):
    runs = {}
    for name, processes, batch in (("single", 1, 2), ("group", 2, 1)):
        recorder = Recorder()
        settings = _group_settings(tiny_sd1_dir, four_images, tmp_path / name, num_processes=processes,
                                   train_batch_size=batch, optimizer=optimizer)
        result = train(settings, recorder)
        assert result.status == "finished", (result.error, recorder.logs())
        assert len(result.files) == 1 and result.step == 4
        runs[name] = (load_file(result.files[0]), recorder)
    (single, one), (group, two) = runs["single"], runs["group"]
    assert single.keys() == group.keys()
    if optimizer == "SGDNesterov":  # every tensor
        worst = max(_relative(single[k], group[k]) for k in single)
        assert worst < 1e-4, worst
    else:  # Adam divides by each gradient's own size: float noise in near-zero gradients stays visible there
        whole = _relative(torch.cat([single[k].flatten() for k in single]), torch.cat([group[k].flatten() for k in single]))
        assert whole < 1e-3, whole
    losses = [(e.loss, f.loss) for e, f in zip(one.of(ev.Step), two.of(ev.Step))]
    assert all(abs(a - b) < 1e-5 * max(1.0, abs(a)) for a, b in losses)  # the group logs the whole batch's loss
    started = two.of(ev.Started)[0]
    assert started.steps_per_epoch == 2 and "(1 per process × 2 processes)" in started.plan
    assert started.device == "cpu × 2 processes (gloo)"
    assert [m.device for m in two.of(ev.Step)[-1].ranks] == ["cpu (rank 0)", "cpu (rank 1)"]
    assert not list((tmp_path / "group").glob("*.tmp*"))


@pytest.mark.slow
def test_torchrun_by_hand_trains_with_the_same_config(tiny_sd1_dir, four_images, tmp_path):
    settings = _group_settings(tiny_sd1_dir, four_images, tmp_path / "out")
    config = tmp_path / "run.json"
    save_settings(settings, str(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    torchrun = Path(sys.executable).with_name("torchrun")  # the console script pip installs with torch
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    done = subprocess.run([*launcher, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "trainer",
                           "train", "--config", str(config)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("finished after 4 steps") == 1  # rank 0 reports; rank 1 only would report a failure
    assert [p.name for p in (tmp_path / "out").glob("*.safetensors")] == ["tiny.safetensors"]


def _workers() -> list[psutil.Process]:
    """This test's training processes (torchrun's children that run ``-m trainer train``)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "trainer" in child.cmdline() and "torch.distributed.run" not in child.cmdline():
                found.append(child)
        except psutil.Error:
            continue
    return found


def _rank_of(process: psutil.Process) -> int:
    return int(process.environ()["RANK"])


def _start_in_thread(settings, control):
    recorder, box = Recorder(), {}
    thread = threading.Thread(target=lambda: box.update(result=train(settings, recorder, control)), daemon=True)
    thread.start()
    return recorder, box, thread


def _wait_for_step(recorder, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(e.step >= step for e in recorder.of(ev.Step)):
        assert time.monotonic() < deadline, recorder.logs()
        assert not recorder.of(ev.Error), recorder.of(ev.Error)
        time.sleep(0.1)


@pytest.mark.slow
def test_killing_one_process_stops_the_other_names_its_rank_and_keeps_what_was_trained(tiny_sd1_dir, four_images,
                                                                                         tmp_path):
    settings = _group_settings(tiny_sd1_dir, four_images, tmp_path / "out", epoch=5000)
    recorder, box, thread = _start_in_thread(settings, Control())
    _wait_for_step(recorder, 3)
    workers = {_rank_of(p): p for p in _workers()}
    assert sorted(workers) == [0, 1]
    os.kill(workers[1].pid, signal.SIGKILL)
    thread.join(120)
    result = box["result"]
    assert result.status == "failed"
    assert "process rank 1 of 2 was killed (signal 9" in result.error, result.error
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers.values())
    saved = list((tmp_path / "out").glob("tiny-step*.safetensors"))
    assert len(saved) == 1 and saved[0] in map(Path, result.files)  # rank 0 saved the steps it had


def _wait_for(recorder, kind, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not recorder.of(kind):
        assert time.monotonic() < deadline, recorder.logs()
        time.sleep(0.05)
    return recorder.of(kind)[-1]


@pytest.mark.slow
def test_save_pause_resume_and_stop_reach_every_process_of_a_group(tiny_sd1_dir, four_images, tmp_path):
    control = Control()
    settings = _group_settings(tiny_sd1_dir, four_images, tmp_path / "out", epoch=5000)
    recorder, box, thread = _start_in_thread(settings, control)
    _wait_for_step(recorder, 2)
    control.request_save()
    saved = _wait_for(recorder, ev.Saved)
    assert saved.kind == "step" and Path(saved.path).is_file()
    control.request_pause()
    paused = _wait_for(recorder, ev.Paused)
    assert "all 2 processes wait" in paused.note
    time.sleep(1.0)
    held = recorder.of(ev.Step)[-1].step
    time.sleep(1.0)
    assert recorder.of(ev.Step)[-1].step == held == paused.step  # neither process goes on
    control.request_resume()
    _wait_for(recorder, ev.Resumed)
    _wait_for_step(recorder, held + 2)
    control.request_stop()
    thread.join(120)
    result = box["result"]
    assert result.status == "stopped", result.error
    assert len(result.files) == 2 and all(Path(f).is_file() for f in result.files)  # Save now, then the stop's
    assert not [p for p in _workers() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _lora_of(result) -> dict:
    return load_file(next(f for f in result.files if os.path.basename(f) == "tiny.safetensors"))  # the final file


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(_relative(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_gradient_accumulation_in_a_group_steps_as_one_process_does(tiny_sd1_dir, four_images, tmp_path):
    common = dict(optimizer="SGDNesterov", gradient_accumulation_steps=2, epoch=3)
    single = train(_group_settings(tiny_sd1_dir, four_images, tmp_path / "one", num_processes=1, train_batch_size=2,
                                   **common))
    group = train(_group_settings(tiny_sd1_dir, four_images, tmp_path / "two", **common))
    assert single.status == group.status == "finished" and single.step == group.step == 3
    assert _worst(_lora_of(single), _lora_of(group)) < 1e-4


@pytest.mark.slow
def test_a_group_resumes_from_its_state_and_says_what_a_new_process_count_changes(tiny_sd1_dir, four_images,
                                                                                  tmp_path):
    common = dict(optimizer="SGDNesterov", epoch=4, save_every_n_epochs=1, save_state=True)
    straight = train(_group_settings(tiny_sd1_dir, four_images, tmp_path / "straight", **common))
    assert straight.status == "finished", straight.error
    state = tmp_path / "straight" / "tiny-000002-state"
    assert state.is_dir()
    recorder = Recorder()
    resumed = train(_group_settings(tiny_sd1_dir, four_images, tmp_path / "resumed", resume=str(state), **common),
                    recorder)
    assert resumed.status == "finished" and resumed.step == 8, resumed.error
    assert _worst(_lora_of(straight), _lora_of(resumed)) < 1e-4
    assert recorder.of(ev.Started)[0].start_step == 4
    alone = Recorder()
    single = train(_group_settings(tiny_sd1_dir, four_images, tmp_path / "alone", resume=str(state), num_processes=1,
                                   train_batch_size=2, **common), alone)
    assert single.status == "finished" and single.step == 8
    assert "was saved by a run of 2 process(es), this run has 1" in alone.logs()


@pytest.mark.slow
def test_a_process_that_fails_is_named_with_its_reason_and_the_run_keeps_what_it_trained(tiny_sd1_dir, tmp_path):
    from trainer.devtools.synthetic import make_image_folder

    images = make_image_folder(tmp_path / "img", {"1_sks dog": 4}, sizes=[(64, 64)], seed=3)
    settings = _group_settings(tiny_sd1_dir, images, tmp_path / "out", epoch=5000, cache_latents=False,
                               bad_image_policy="stop")
    recorder, box, thread = _start_in_thread(settings, Control())
    _wait_for_step(recorder, 3)
    broken = next(p for p in sorted((images / "1_sks dog").iterdir()) if p.suffix != ".txt")
    broken.write_bytes(b"not an image any more")  # read again each step (latents are not cached)
    thread.join(180)
    result = box["result"]
    assert result.status == "failed"
    assert "process rank " in result.error and " of 2: " in result.error and broken.name in result.error
    assert "every process of the run stopped" in result.error
    saved = list((tmp_path / "out").glob("tiny-step*.safetensors"))
    assert len(saved) == 1 and saved[0] in map(Path, result.files)
    assert not [p for p in _workers() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_group_ends_when_the_process_that_started_it_is_killed(tiny_sd1_dir, four_images, tmp_path):
    config = tmp_path / "run.json"
    save_settings(_group_settings(tiny_sd1_dir, four_images, tmp_path / "out", epoch=5000), str(config))
    app = subprocess.Popen([sys.executable, "-m", "trainer", "train", "--config", str(config)], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while len(workers := [p for p in psutil.Process(app.pid).children(recursive=True)
                          if "torch.distributed.run" not in p.cmdline()]) < 2:
        assert time.monotonic() < deadline and app.poll() is None
        time.sleep(0.2)
    time.sleep(3)  # training
    app.kill()  # as a crash of the GUI would
    app.wait()
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
