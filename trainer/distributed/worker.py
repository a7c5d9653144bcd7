"""One process of a group: ``python -m trainer train`` when torchrun started it.

Rank 0 reports as any run does (and, in a group Nekoya started, writes its events for the launcher); the
other ranks report only their failure, naming their rank. SIGTERM (torchrun ends the group when a process
failed) and Ctrl+C ask for a stop, so rank 0 still saves what exists.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

from trainer import events as ev
from trainer.distributed.group import join_group
from trainer.distributed.rules import GROUP_DIR_ENV
from trainer.distributed.sync import GroupControl
from trainer.distributed.wire import EventFile


def events_path(folder: str, rank: int) -> str:
    return os.path.join(folder, f"events.rank{rank}.jsonl")


def run_worker(settings: Any, printer: Any) -> str:
    """Train as this process's rank; returns the run's status ("finished", "stopped", "failed")."""
    from trainer.loop import train

    group = join_group()
    folder = os.environ.get(GROUP_DIR_ENV) or None
    control = GroupControl(group, folder)
    if settings.num_processes != group.processes:  # the group torchrun made is the run's
        settings = settings.model_copy(update={"num_processes": group.processes})
    files = [EventFile(events_path(folder, group.rank))] if folder else []
    sink = _rank_sink(group.rank, group.processes, printer, files)
    _stop_on_signals(control)
    try:
        return train(settings, sink, control).status
    finally:
        for f in files:
            f.close()
        group.leave()


def _rank_sink(rank: int, processes: int, printer: Any, files: list) -> ev.EventSink:
    def sink(event: ev.Event) -> None:
        if rank == 0 or isinstance(event, ev.Error):
            if rank and isinstance(event, ev.Error):
                event = ev.Error(f"process rank {rank} of {processes}: {event.message}", event.field, event.hint,
                                 event.file)
            printer(event)
            for f in files:
                f(event)
    return sink


def _stop_on_signals(control: GroupControl) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: control.request_stop())
