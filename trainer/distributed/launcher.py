"""Start a group of processes on this machine with torchrun, and be its run for the GUI or the CLI.

``train_group`` writes the settings to a config file, starts ``torchrun ... -m trainer train --config C``,
passes rank 0's events on to the sink, writes the Control's commands where rank 0 reads them, and ends with
one result: rank 0's, or the failure of whichever rank failed first, by its rank.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from trainer import events as ev
from trainer.control import Control
from trainer.distributed.rules import (GROUP_DIR_ENV, GroupLayout, local_torchrun_command, starts_group,  # noqa: F401
                                       torchrun_extra_args)
from trainer.distributed.sync import write_commands
from trainer.distributed.wire import EventReader
from trainer.distributed.worker import events_path

POLL_S = 0.1
_TERMINAL = (ev.Finished, ev.Stopped, ev.Error)
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train_group(settings: Any, sink: ev.EventSink, control: Control):
    """Train with ``settings.num_processes`` processes on this machine; returns a ``trainer.loop.TrainResult``.
    The preflight check runs here first, so a run that cannot start says why once, before any process starts."""
    from trainer.loop import TrainResult
    from trainer.run_errors import failure_problem
    from trainer.run_setup import plan_run

    from trainer.device_lease import TRAINING, take
    from trainer.optim.precision import pick_device

    try:
        plan_run(settings, lambda message, level="info": None)  # each process tells the findings in its log
        # the group's processes use this machine's GPUs (or cores): no Try it or image job beside them meanwhile
        with take(pick_device(), TRAINING, wait_log=lambda message: sink(ev.Log(message))):
            return _launch(settings, sink, control, TrainResult)
    except Exception as exc:  # a refusal, or torchrun that cannot be started: one Error event, as any run ends
        problem = failure_problem(exc, settings)
        sink(ev.Error.of(problem))
        return TrainResult("failed", 0, (), problem.message, problem.field)


def _launch(settings: Any, sink: ev.EventSink, control: Control, result_type: type):
    from trainer.settings import save_settings

    layout = GroupLayout.of(settings)
    folder = tempfile.mkdtemp(prefix="nekoya-group-")
    try:
        config = os.path.join(folder, "settings.json")
        save_settings(settings, config)
        command = local_torchrun_command(layout, config, torchrun_extra_args(settings.extra_accelerate_launch_args))
        sink(ev.Log(f"starting {layout.processes} processes with torchrun (port {layout.port})"))
        log_path = os.path.join(folder, "torchrun.log")
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(command, env=_worker_env(settings, layout, folder), stdout=log,
                                       stderr=subprocess.STDOUT, cwd=_PROJECT_ROOT, start_new_session=True,
                                       preexec_fn=_end_with_this_process if sys.platform.startswith("linux") else None)
            relay = _Relay(folder, layout.processes, sink, control)
            while process.poll() is None:
                relay.pass_on()
                time.sleep(POLL_S)
            relay.pass_on()
        with open(log_path, encoding="utf-8", errors="replace") as f:
            output = f.read()
        return relay.result(process.returncode, output, result_type)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _end_with_this_process() -> None:
    """In torchrun's process before it starts (Linux): SIGTERM when the process that started it dies, so a
    killed GUI leaves no group training on (torchrun then ends its workers)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _worker_env(settings: Any, layout: GroupLayout, folder: str) -> dict[str, str]:
    env = dict(os.environ)
    env[GROUP_DIR_ENV] = folder
    env["OMP_NUM_THREADS"] = str(max(1, int(settings.num_cpu_threads_per_process or 1)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH", "")) if p)
    if layout.gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, layout.gpu_ids))
    if sys.platform.startswith("linux"):  # the processes meet on this machine: gloo's loopback interface
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    elif sys.platform == "darwin":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo0")
    return env


class _Relay:
    """Rank 0's events to the sink, the Control's requests to the commands file."""

    def __init__(self, folder: str, processes: int, sink: ev.EventSink, control: Control) -> None:
        self.folder, self.processes, self.sink, self.control = folder, processes, sink, control
        self.readers = [EventReader(events_path(folder, rank)) for rank in range(processes)]
        self.terminal: list[ev.Event] = [None] * processes  # each rank's last Finished/Stopped/Error
        self.files: list[str] = []
        self.step = 0
        self.commands = (False, 0, 0, None)
        self.counts = {"save": 0, "sample": 0}

    def pass_on(self) -> None:
        for rank, reader in enumerate(self.readers):
            for event in reader.new_events():
                if isinstance(event, _TERMINAL):
                    self.terminal[rank] = event
                    continue
                if isinstance(event, ev.Saved) and event.path not in self.files:
                    self.files.append(event.path)
                if isinstance(event, ev.Step):
                    self.step = event.step
                self.sink(event)
        self._write_commands()

    def _write_commands(self) -> None:
        c = self.control
        self.counts["save"] += c.take_save_request()
        self.counts["sample"] += c.take_sample_request()
        commands = (c.stop_requested, self.counts["save"], self.counts["sample"], "keep" if c.pause_requested else None)
        if commands != self.commands:
            self.commands = commands
            write_commands(self.folder, *commands)

    def result(self, returncode: int, output: str, result_type: type):
        files = tuple(f for f in self.files if os.path.exists(f))
        main = self.terminal[0]
        if returncode == 0 and isinstance(main, (ev.Finished, ev.Stopped)):
            self.sink(main)
            status = "finished" if isinstance(main, ev.Finished) else "stopped"
            return result_type(status, main.step, main.files)
        error = self._failure(returncode, output)
        self.sink(error)
        return result_type("failed", self.step, files, error.message, error.field)

    def _failure(self, returncode: int, output: str) -> ev.Error:
        """The first failure: a rank's own Error, else the rank torchrun names, else rank 0's message."""
        errors = [(rank, e) for rank, e in enumerate(self.terminal) if isinstance(e, ev.Error)]
        own = [(rank, e) for rank, e in errors if not _lost_peer(e.message)]
        if own:
            rank, error = own[0]
            return ev.Error(_group_note(error.message, rank, self.processes), error.field, error.hint, error.file)
        named = _failed_rank(output)
        if named is not None:
            rank, how = named
            return ev.Error(f"process rank {rank} of {self.processes} {how}; every process of the run stopped, and "
                            "rank 0 saved what the run had trained", None,
                            "see the run log above; out of memory or a killed process are the usual causes")
        tail = "\n".join(output.strip().splitlines()[-15:])
        return ev.Error(f"the group of {self.processes} processes failed (torchrun exit code {returncode}):\n{tail}")


def _group_note(message: str, rank: int, processes: int) -> str:
    prefix = "" if message.startswith("process rank") else f"process rank {rank} of {processes}: "
    return f"{prefix}{message}; every process of the run stopped"


def _lost_peer(message: str) -> bool:
    return "another process of the group" in message.lower()


def _failed_rank(output: str) -> tuple[int, str] | None:
    """The rank of torchrun's "Root Cause (first observed failure)" and how it ended."""
    cause = output.split("Root Cause", 1)[-1] if "Root Cause" in output else ""
    rank = re.search(r"rank\s*:\s*(\d+)", cause)
    if rank is None:
        return None
    code = re.search(r"exitcode\s*:\s*(-?\d+)", cause)
    signal_name = re.search(r"Signal \d+ \((SIG\w+)\)", cause)
    how = "failed"
    if code and int(code.group(1)) < 0:
        how = f"was killed (signal {-int(code.group(1))}" + (f", {signal_name.group(1)}" if signal_name else "") + ")"
    elif code:
        how = f"failed (exit code {code.group(1)})"
    return int(rank.group(1)), how
