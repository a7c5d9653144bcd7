"""Commands reach every process of a group at the same step.

The launcher writes the GUI's commands (Stop, Save now, Sample now, Pause) to a small JSON file; rank 0 reads
it at each step boundary, and one collective hands every rank rank 0's commands (a stop asked of any rank,
e.g. by a signal, counts too) together with each rank's memory. Every rank then acts on the same commands at
the same step: rank 0 saves and samples, the others go on with it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from trainer import events as ev
from trainer.control import Control
from trainer.distributed.group import Group, memory_of, memory_row
from trainer.state import memory_snapshot

COMMANDS_FILE = "commands.json"
PAUSE_POLL_S = 0.25  # a paused group checks for Resume this often


def write_commands(folder: str, stop: bool, save: int, sample: int, pause: str | None) -> None:
    """The launcher's side: the commands so far (``save``/``sample`` count requests), written atomically."""
    path = os.path.join(folder, COMMANDS_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"stop": stop, "save": save, "sample": sample, "pause": pause}, f)
    os.replace(path + ".tmp", path)


@dataclass
class _Commands:
    stop: bool = False
    save: bool = False
    sample: bool = False
    pause: bool = False

    def row(self) -> list[float]:
        return [float(self.stop), float(self.save), float(self.sample), float(self.pause)]


class GroupControl(Control):
    """A group worker's Control: the loop asks it the usual questions and gets the group's agreed answers."""

    def __init__(self, group: Group, folder: str | None) -> None:
        super().__init__()
        self.group, self.folder = group, folder
        self._seen = {"save": 0, "sample": 0}
        self._mtime = 0.0
        self._agreed = _Commands()
        self.rank_memory: tuple[ev.Memory, ...] = ()

    # -- the loop's questions ----------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        return self._agreed.stop

    def take_save_request(self) -> bool:
        taken, self._agreed.save = self._agreed.save, False
        return taken

    def take_sample_request(self) -> bool:
        taken, self._agreed.sample = self._agreed.sample, False
        return taken

    def between_steps(self, run: Any) -> bool:
        self.agree(run.device)
        if self._agreed.pause and not self._agreed.stop:
            self._hold(run)
        return self._agreed.stop

    # -- agreeing ----------------------------------------------------------------------------------
    def agree(self, device: Any) -> None:
        """One collective: rank 0's commands (and any rank's stop) and every rank's memory, to all ranks."""
        if self.group.is_main:
            self._read_commands()
        mine = _Commands(super().stop_requested, self._save.is_set(), self._sample.is_set(), self.pause_requested)
        self._save.clear()
        self._sample.clear()
        rows = self.group.gather(mine.row() + memory_row(memory_snapshot(device)))
        first = rows[0]
        self._agreed = _Commands(any(r[0] for r in rows), self._agreed.save or bool(first[1]),
                                 self._agreed.sample or bool(first[2]), bool(first[3]))
        kind = getattr(device, "type", "cpu")
        self.rank_memory = tuple(memory_of(r[4:], f"{kind} (rank {i})") for i, r in enumerate(rows))

    def _read_commands(self) -> None:
        if not self.folder:
            return
        path = os.path.join(self.folder, COMMANDS_FILE)
        try:
            mtime = os.stat(path).st_mtime_ns
            if mtime == self._mtime:
                return
            with open(path, encoding="utf-8") as f:
                commands = json.load(f)
        except (OSError, ValueError):
            return  # not written yet, or being replaced: read it at the next step
        self._mtime = mtime
        if commands.get("stop"):
            self.request_stop()
        for name, request in (("save", self.request_save), ("sample", self.request_sample)):
            if int(commands.get(name, 0)) > self._seen[name]:
                self._seen[name] = int(commands[name])
                request()
        if commands.get("pause"):
            self.request_pause()
        else:
            self.request_resume()

    def _hold(self, run: Any) -> None:
        """Every rank waits here, agreeing again every PAUSE_POLL_S, until rank 0 is resumed or stopped."""
        started = time.perf_counter()
        if self.group.is_main:
            run.sink(ev.Paused(run.step, note=f"all {self.group.processes} processes wait at this step, "
                                               "model, optimizer and data kept loaded"))
        while self._agreed.pause and not self._agreed.stop:
            time.sleep(PAUSE_POLL_S)
            self.agree(run.device)
            if self.take_save_request() and self.group.is_main:
                run.outputs.save("step", run.step, run.epoch)
        paused = time.perf_counter() - started
        run.meter.exclude_pause(paused)
        if self.group.is_main:
            run.sink(ev.Resumed(run.step, paused))
