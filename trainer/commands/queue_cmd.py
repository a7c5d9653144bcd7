"""``python -m trainer queue {add,list,run,remove}``: the job queue (``trainer.job_queue``) from a terminal.

``queue run`` trains the waiting jobs one after another with ``train``'s progress bar; a job left running by a
process that died goes on from its newest state folder (or fails, saying why) first. Jobs are numbered from 1
as ``queue list`` shows them.
"""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("queue", help="the job queue: add configs, list them, run them one after another")
    sub = p.add_subparsers(dest="queue_command", required=True)
    add = sub.add_parser("add", help="add a config as a waiting job (checked now and again when it starts)")
    add.add_argument("config", metavar="CONFIG", help="kohya_ss / Nekoya JSON config")
    add.add_argument("--name", default="", help="the job's name (default: its output name)")
    add.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one setting (kohya_ss key), may be repeated")
    sub.add_parser("list", help="list the jobs: number, state, steps, time, name, output")
    sub.add_parser("run", help="train the waiting jobs one after another")
    remove = sub.add_parser("remove", help="remove job N (as numbered by queue list)")
    remove.add_argument("number", metavar="N", type=int)
    return p


def run(args, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from trainer.job_queue import JobQueue, QueueError

    out, err = out or sys.stdout, err or sys.stderr
    queue = JobQueue()
    try:
        return COMMANDS[args.queue_command](queue, args, out, err)
    except QueueError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_INVALID


def _add(queue, args, out, err) -> int:
    from trainer.cli import load
    from trainer.settings import SettingsError

    try:
        settings = load(args.config, args.overrides)
    except SettingsError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_INVALID
    job = queue.add(settings, args.name)
    print(f"added job {len(queue.jobs())}: {job.name} -> {job.output}", file=out)
    return EXIT_OK


def _list(queue, args, out, err) -> int:
    jobs = queue.jobs()
    if not jobs:
        print("the queue is empty", file=out)
    for number, job in enumerate(jobs, 1):
        print(job_line(number, job), file=out)
    return EXIT_OK


def job_line(number: int, job) -> str:
    steps = f"{job.step}/{job.total_steps}" if job.total_steps else "-"
    reason = f" ({job.reason})" if job.reason else ""
    return f"{number:>3}  {job.state:<8} {steps:>11} {job.elapsed_s:>7.0f}s  {job.name}  {job.output}{reason}"


def _remove(queue, args, out, err) -> int:
    jobs = queue.jobs()
    if not 1 <= args.number <= len(jobs):
        print(f"error: no job {args.number}: the queue has {len(jobs)}", file=err)
        return EXIT_INVALID
    job = queue.remove(jobs[args.number - 1].id)
    print(f"removed job {args.number}: {job.name}", file=out)
    return EXIT_OK


def _run(queue, args, out, err) -> int:
    from trainer.job_queue import run_job

    from . import train_cmd

    for note in queue.recover():
        print(note, file=out)
    failed = 0
    while (job := queue.claim_next()) is not None:
        print(f"job {job.name} -> {job.output}" + (f" (from {job.resume})" if job.resume else ""), file=out)
        ended = run_job(queue, job, lambda settings, sink: _train(settings, sink, out, err))
        print(f"job {job.name}: {ended.state}" + (f" ({ended.reason})" if ended.reason else ""), file=out)
        failed += ended.state != "done"
        if ended.state == "stopped":  # Ctrl+C stops the queue too, not only this job
            return train_cmd.EXIT_STOPPED
    print("no waiting jobs" + (f"; {failed} did not finish" if failed else ""), file=out)
    return EXIT_FAILED if failed else EXIT_OK


def _train(settings, sink, out, err):
    """``train_cmd``'s progress bar and Ctrl+C handling, with the queue's progress sink beside it."""
    from trainer.control import Control
    from trainer.loop import train

    from .train_cmd import ProgressPrinter, _ctrl_c_requests_stop

    printer, control = ProgressPrinter(out, err), Control()

    def both(event) -> None:
        printer(event)
        sink(event)

    with _ctrl_c_requests_stop(control, printer):
        return train(settings, both, control)


COMMANDS = {"add": _add, "list": _list, "run": _run, "remove": _remove}
