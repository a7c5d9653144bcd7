"""The job queue: kept on disk, checked when added and when started, reordered, duplicated, edited back; a job
left running by a dead process goes on from its state folder (or fails, saying why); ``python -m trainer queue
run`` killed in the middle of a job and started again finishes every job."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from test_train import images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer.job_queue import DIED_WITHOUT_STATE, JobQueue, QueueError, run_job
from trainer.settings import TrainingSettings, save_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEAD_PID = 2 ** 22 + 12345  # above Linux's pid_max default: never a live process


def no_errors(settings):
    return []


def settings_for(out, name, **values):
    return TrainingSettings(output_dir=str(out), output_name=name, **values)


@pytest.fixture
def queue(tmp_path):
    return JobQueue(str(tmp_path / "q"), check=no_errors)


def names(queue):
    return [j.name for j in queue.jobs()]


def test_add_list_and_a_new_queue_object_reads_the_same_jobs(queue, tmp_path):
    queue.add(settings_for(tmp_path, "a", network_dim=8))
    queue.add(settings_for(tmp_path, "b"), name="second")
    again = JobQueue(os.path.dirname(queue.path), check=no_errors)
    jobs = again.jobs()
    assert [j.name for j in jobs] == ["a", "second"] and {j.state for j in jobs} == {"waiting"}
    assert jobs[0].output == os.path.join(str(tmp_path), "a") and jobs[0].config["network_dim"] == 8
    assert again.settings_of(jobs[0].id).network_dim == 8  # edit back into the form
    assert not [f for f in os.listdir(os.path.dirname(queue.path)) if f != "queue.json"]  # no temp files left


def test_a_config_with_errors_is_refused_naming_them(tmp_path):
    queue = JobQueue(str(tmp_path / "q"), check=lambda s: ["train_data_dir: the folder does not exist"])
    with pytest.raises(QueueError, match="train_data_dir: the folder does not exist"):
        queue.add(settings_for(tmp_path, "a"))
    assert queue.jobs() == []


def test_the_real_quick_check_refuses_a_missing_model(tmp_path):
    queue = JobQueue(str(tmp_path / "q"))
    settings = settings_for(tmp_path, "a", pretrained_model_name_or_path=str(tmp_path / "none"),
                            train_data_dir=str(tmp_path))
    with pytest.raises(QueueError, match="not added to the queue: .*pretrained_model_name_or_path"):
        queue.add(settings)


def test_move_duplicate_remove(queue, tmp_path):
    a, b, c = (queue.add(settings_for(tmp_path, n)) for n in "abc")
    queue.move(c.id, -1)
    assert names(queue) == ["a", "c", "b"]
    queue.move(a.id, -1)  # already first: stays
    queue.move(b.id, 1)  # already last: stays
    assert names(queue) == ["a", "c", "b"]
    copy = queue.duplicate(a.id)
    assert names(queue) == ["a", "a (copy)", "c", "b"] and copy.config == a.config and copy.id != a.id
    queue.remove(c.id)
    assert names(queue) == ["a", "a (copy)", "b"]
    with pytest.raises(QueueError, match="no job"):
        queue.remove(c.id)


def test_a_running_job_of_a_live_process_cannot_be_removed(queue, tmp_path):
    job = queue.add(settings_for(tmp_path, "a"))
    queue.update(job.id, state="running", pid=os.getppid())
    with pytest.raises(QueueError, match="is running"):
        queue.remove(job.id)


def test_the_check_runs_again_when_a_job_starts(tmp_path):
    verdicts = {"a": [], "b": []}
    queue = JobQueue(str(tmp_path / "q"), check=lambda s: verdicts[s.output_name])
    queue.add(settings_for(tmp_path, "a"))
    queue.add(settings_for(tmp_path, "b"))
    verdicts["a"] = ["train_data_dir: the folder is gone"]
    job = queue.claim_next()
    assert job.name == "b" and job.state == "running" and job.pid == os.getpid()
    first = queue.jobs()[0]
    assert first.state == "failed" and "the folder is gone" in first.reason


def test_run_job_records_how_each_run_ended(queue, tmp_path):
    for name in ("ok", "stop", "bad", "boom"):
        queue.add(settings_for(tmp_path, name))
    results = {"ok": SimpleNamespace(status="finished", step=3, error=None),
               "stop": SimpleNamespace(status="stopped", step=1, error=None),
               "bad": SimpleNamespace(status="failed", step=0, error="out of memory")}

    def train(settings, sink):
        if settings.output_name == "boom":
            raise RuntimeError("no GPU")
        return results[settings.output_name]

    ended = [run_job(queue, queue.claim_next(), train) for _ in range(4)]
    assert [(j.state, j.reason) for j in ended] == [
        ("done", ""), ("stopped", "stopped"), ("failed", "out of memory"), ("failed", "RuntimeError: no GPU")]
    assert queue.jobs()[0].step == 3 and queue.claim_next() is None


def test_recover_resumes_from_the_newest_state_folder_or_fails_without_state(queue, tmp_path):
    out = tmp_path / "out"
    for folder in ("s-000001-state", "s-step00000003-state", "s-half-state"):
        (out / folder).mkdir(parents=True)
    for folder in ("s-000001-state", "s-step00000003-state"):  # the half-written one has no manifest
        (out / folder / "manifest.json").write_text("{}")
    os.utime(out / "s-000001-state" / "manifest.json")
    os.utime(out / "s-000001-state", (time.time() - 100, time.time() - 100))
    with_state = queue.add(settings_for(out, "s", save_state=True))
    no_state = queue.add(settings_for(out, "n"))
    fresh = queue.add(settings_for(out, "f", save_state=True))
    live = queue.add(settings_for(out, "l"))
    for job in (with_state, no_state, fresh):
        queue.update(job.id, state="running", pid=DEAD_PID)
    queue.update(live.id, state="running", pid=os.getppid())
    notes = queue.recover()
    jobs = queue.jobs()
    assert jobs[0].state == "waiting" and jobs[0].resume == str(out / "s-step00000003-state")
    assert jobs[0].settings().resume == jobs[0].resume and not jobs[0].config.get("resume")  # the config stays frozen
    assert (jobs[1].state, jobs[1].reason) == ("failed", DIED_WITHOUT_STATE)
    assert jobs[2].state == "waiting" and jobs[2].resume == ""  # save_state on, nothing saved yet: from the start
    assert jobs[3].state == "running"  # its process lives: not touched
    assert len(notes) == 3 and DIED_WITHOUT_STATE in notes[1]


def test_cli_add_list_remove(tmp_path, monkeypatch, capsys):
    from trainer.cli import main

    monkeypatch.setenv("NEKOYA_QUEUE_DIR", str(tmp_path / "q"))
    config = save_settings(settings_for(tmp_path, "cli"), tmp_path / "cli.json")
    monkeypatch.setattr("trainer.job_queue.check_errors", no_errors)
    assert main(["queue", "add", str(config), "--set", "network_dim=16"]) == 0
    assert main(["queue", "list"]) == 0
    listed = capsys.readouterr().out
    assert "added job 1: cli" in listed and "waiting" in listed and os.path.join(str(tmp_path), "cli") in listed
    assert main(["queue", "remove", "2"]) == 2 and main(["queue", "remove", "1"]) == 0
    assert main(["queue", "list"]) == 0 and "the queue is empty" in capsys.readouterr().out


# ---- a real queue run, killed in the middle of its second job ---------------------------------------------------

def queue_cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "trainer", "queue", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def read_jobs(folder):
    try:
        with open(os.path.join(folder, "queue.json"), encoding="utf-8") as f:
            return json.load(f)["jobs"]
    except (FileNotFoundError, ValueError):
        return []


def saved_state(folder) -> bool:
    return folder.is_dir() and any((p / "manifest.json").is_file() for p in folder.glob("*-state"))


def test_queue_run_killed_mid_job_and_run_again_finishes_every_job(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    env = {**os.environ, "NEKOYA_QUEUE_DIR": str(tmp_path / "q")}
    for name, epochs in (("first", 1), ("second", 4), ("third", 1)):  # 2 steps an epoch
        config = save_settings(tiny_settings(tiny_sd1_dir, images, tmp_path / name, output_name=name, epoch=epochs,
                                             save_state=True, save_every_n_steps=1), tmp_path / f"{name}.json")
        add = queue_cli(["add", str(config)], env)
        assert add.wait(120) == 0, add.stdout.read()
    first = queue_cli(["run"], env, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (read_jobs(env["NEKOYA_QUEUE_DIR"])[1]["state"] == "running" and saved_state(tmp_path / "second")):
        assert time.monotonic() < deadline and first.poll() is None, first.stdout.read() if first.poll() is not None else ""
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
    assert [j["state"] for j in read_jobs(env["NEKOYA_QUEUE_DIR"])] == ["done", "running", "waiting"]
    again = queue_cli(["run"], env)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output
    assert "second: goes on from" in output and "resuming at step" in output
    jobs = read_jobs(env["NEKOYA_QUEUE_DIR"])
    assert [j["state"] for j in jobs] == ["done", "done", "done"], output
    assert [j["step"] for j in jobs] == [2, 8, 2]
    for name in ("first", "second", "third"):
        assert (tmp_path / name / f"{name}.safetensors").is_file()


# ---- the GUI's RunManager runs the queue --------------------------------------------------------------------------

def wait_until(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_the_run_manager_runs_waiting_jobs_one_after_another_and_stop_halts_the_queue(queue, tmp_path):
    from app.run_manager import RunManager
    from test_gui_run import scripted_trainer

    trained, gate = [], threading.Event()
    script = scripted_trainer(total=3, gate=gate)

    def train(settings, sink, control):
        trained.append(settings.output_name)
        return script(settings, sink, control)

    for name in ("a", "b", "c"):
        queue.add(settings_for(tmp_path, name))
    runs = RunManager(train)
    runs.attach_queue(queue)  # at app start: the waiting jobs go on
    gate.set()
    wait_until(lambda: [j.state for j in queue.jobs()] == ["done"] * 3)
    assert trained == ["a", "b", "c"] and [j.step for j in queue.jobs()] == [3, 3, 3]
    gate.clear()
    queue.add(settings_for(tmp_path, "d"))
    queue.add(settings_for(tmp_path, "e"))
    assert runs.run_queue()[0] and not runs.run_queue()[0]  # one run at a time
    wait_until(lambda: runs.snapshot().status == "running")
    runs.stop()
    gate.set()
    wait_until(lambda: queue.jobs()[3].state == "stopped")
    time.sleep(0.3)
    assert [j.state for j in queue.jobs()][3:] == ["stopped", "waiting"] and not runs.busy  # Stop stops the queue


def test_an_empty_queue_writes_no_file(tmp_path):
    queue = JobQueue(str(tmp_path / "q"), check=no_errors)
    assert queue.recover() == [] and not (tmp_path / "q").exists()


# ---- the panel's decisions ------------------------------------------------------------------------------------------

def test_the_panel_lists_jobs_and_forwards_clicks(queue, tmp_path):
    from app.queue_panel import add_request, job_action, job_choices, render_queue
    from app.run_manager import RunManager

    runs = RunManager(lambda settings, sink, control: None)
    runs.queue = queue  # attached without starting anything
    runs.run_queue = lambda: (False, "busy")
    values = {"output_dir": str(tmp_path), "output_name": "from_form", "network_dim": 8}
    assert "Added from_form to the queue." in add_request(queue, runs, values, {})
    assert "Not added" in add_request(queue, runs, {**values, "network_dim": "many"}, {})
    job = queue.jobs()[0]
    assert job.config["network_dim"] == 8 and job_choices([job]) == [("1. from_form", job.id)]
    table = render_queue(queue.jobs())
    assert 'data-state="waiting"' in table and "from_form" in table and os.path.join(str(tmp_path), "from_form") in table
    text, copy = job_action(queue, "duplicate", job.id)
    assert "Duplicated" in text and names(queue) == ["from_form", "from_form (copy)"]
    assert job_action(queue, "up", copy) == ("", copy) and names(queue)[0] == "from_form (copy)"
    assert "Pick a job first" in job_action(queue, "remove", None)[0]
    assert job_action(queue, "remove", copy)[1] is None and names(queue) == ["from_form"]
