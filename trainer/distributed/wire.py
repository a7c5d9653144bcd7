"""Events between processes: one JSON object per line, ``{"event": "Step", ...fields}``.

A group's rank 0 writes its events to a file; the launcher in the GUI's (or CLI's) process reads them back
as the same typed events, so the live view cannot tell a group run from an in-process one.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import IO

from trainer import events as ev

_TYPES = {cls.__name__: cls for cls in (ev.Started, ev.Step, ev.EpochEnd, ev.Saved, ev.DiskFull, ev.Paused,
                                        ev.Resumed, ev.Sample, ev.Log, ev.Error, ev.Finished, ev.Stopped)}


def to_line(event: ev.Event) -> str:
    return json.dumps({"event": type(event).__name__, **dataclasses.asdict(event)}) + "\n"


def from_line(line: str) -> ev.Event:
    data = json.loads(line)
    cls = _TYPES[data.pop("event")]
    if cls is ev.Step:
        data["memory"] = ev.Memory(**data["memory"])
        data["ranks"] = tuple(ev.Memory(**m) for m in data.get("ranks", ()))
    if "files" in data:
        data["files"] = tuple(data["files"])
    return cls(**data)


class EventFile:
    """A sink that appends events to ``path`` (flushed per event: the reader follows along)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] = open(path, "a", encoding="utf-8")

    def __call__(self, event: ev.Event) -> None:
        self._file.write(to_line(event))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class EventReader:
    """Reads the events appended to ``path`` since the last call (whole lines only)."""

    def __init__(self, path: str) -> None:
        self.path, self._offset, self._partial = path, 0, ""

    def new_events(self) -> list[ev.Event]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            f.seek(self._offset)
            text = f.read()
            self._offset = f.tell()
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        return [from_line(line) for line in lines if line.strip()]
