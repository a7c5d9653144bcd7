"""The job queue: frozen configs trained one after another, kept on disk (torch-free).

The queue is one JSON file (``queue.json`` in ``$NEKOYA_QUEUE_DIR``, else ``<repo>/queue/``), rewritten
atomically on every change and read again before every change, so the GUI and ``python -m trainer queue``
see the same jobs and an app restart finds them. Each job carries its settings as a kohya_ss dict, frozen
when it was added. ``claim_next`` and ``run_job`` are the steps both the CLI and the GUI use to run the waiting jobs.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

from trainer.problems import NekoyaError
from trainer.safety import atomic_write_text, pid_alive
from trainer.settings import settings_from_dict, settings_to_dict

log = logging.getLogger(__name__)
DIED_WITHOUT_STATE = "the app stopped while it ran and it saved no state"
PROGRESS_EVERY_S = 2.0  # how often a running job's steps and time are written to disk
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class QueueError(NekoyaError):
    """A queue operation that cannot be done (a config with errors, an unknown job, a running job removed)."""


def queue_dir() -> str:
    return os.environ.get("NEKOYA_QUEUE_DIR") or os.path.join(REPO, "queue")


@dataclass(frozen=True)
class Job:
    id: str
    name: str
    config: dict  # kohya_ss settings, frozen when added
    state: str = "waiting"  # waiting, running, done, failed or stopped
    step: int = 0
    total_steps: int = 0
    elapsed_s: float = 0.0
    reason: str = ""  # why it failed or stopped
    pid: int = 0  # the process running it, so a restart can tell a dead run from a live one
    resume: str = ""  # the state folder a restarted job goes on from

    @property
    def output(self) -> str:
        return os.path.join(str(self.config.get("output_dir", "")), str(self.config.get("output_name", "")))

    def settings(self):
        """The frozen settings, with ``resume`` set when the job goes on from a state folder."""
        settings = settings_from_dict(self.config).settings
        return settings.model_copy(update={"resume": self.resume}) if self.resume else settings

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def check_errors(settings) -> list[str]:
    """The quick preflight check's errors, as lines ("field: message")."""
    from trainer.preflight import check

    return [f"{p.field}: {p.message}" if p.field else p.message for p in check(settings, deep=False).errors]


def newest_state(config: dict) -> str:
    """The newest ``<output_name>*-state`` folder (with its manifest) in the job's output folder, or ""."""
    pattern = os.path.join(glob.escape(str(config.get("output_dir", ""))),
                           glob.escape(str(config.get("output_name", ""))) + "*-state")
    found = [p for p in glob.glob(pattern) if os.path.isfile(os.path.join(p, "manifest.json"))]
    return max(found, key=os.path.getmtime) if found else ""


class JobQueue:
    """The jobs on disk. Every method reads the file, changes it and writes it whole."""

    def __init__(self, folder: str | None = None, check: Callable[[Any], list[str]] | None = None) -> None:
        self.path = os.path.join(folder or queue_dir(), "queue.json")
        self._given_check = check
        self._lock = threading.RLock()

    # -- reading and writing ----------------------------------------------
    def jobs(self) -> list[Job]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise QueueError(f"cannot read the queue {self.path}: {exc}") from exc
        return [Job.from_dict(j) for j in data.get("jobs", [])]

    def _save(self, jobs: list[Job]) -> None:
        text = json.dumps({"version": 1, "jobs": [asdict(j) for j in jobs]}, indent=2, ensure_ascii=False)
        atomic_write_text(self.path, text + "\n")

    def _change(self, change: Callable[[list[Job]], Any]) -> Any:
        with self._lock:
            jobs = self.jobs()
            before = list(jobs)
            result = change(jobs)
            if jobs != before:  # nothing changed: no file written (an empty queue makes no folder)
                self._save(jobs)
            return result

    def _check(self, settings) -> list[str]:
        return (self._given_check or check_errors)(settings)

    def find(self, job_id: str) -> Job:
        for job in self.jobs():
            if job.id == job_id:
                return job
        raise QueueError(f"no job {job_id} in the queue")

    # -- the operations the GUI and the CLI offer ---------------------------
    def add(self, settings, name: str = "") -> Job:
        """Append the settings as a waiting job; refused, naming them, when the quick check finds errors."""
        errors = self._check(settings)
        if errors:
            raise QueueError("not added to the queue: " + "; ".join(errors))
        config = settings_to_dict(settings)
        job = Job(id=uuid.uuid4().hex[:8], name=name or settings.output_name or "job", config=config)
        self._change(lambda jobs: jobs.append(job))
        return job

    def remove(self, job_id: str) -> Job:
        def change(jobs: list[Job]) -> Job:
            index = _index(jobs, job_id)
            if jobs[index].state == "running" and _alive(jobs[index]):
                raise QueueError(f"job {jobs[index].name} is running: stop it first")
            return jobs.pop(index)

        return self._change(change)

    def move(self, job_id: str, delta: int) -> None:
        """Move a job ``delta`` places (-1: up, 1: down), within the list."""
        def change(jobs: list[Job]) -> None:
            index = _index(jobs, job_id)
            target = min(max(index + delta, 0), len(jobs) - 1)
            jobs.insert(target, jobs.pop(index))

        self._change(change)

    def duplicate(self, job_id: str) -> Job:
        def change(jobs: list[Job]) -> Job:
            index = _index(jobs, job_id)
            copy = Job(id=uuid.uuid4().hex[:8], name=jobs[index].name + " (copy)", config=dict(jobs[index].config))
            jobs.insert(index + 1, copy)
            return copy

        return self._change(change)

    def settings_of(self, job_id: str):
        """Edit back into the form: the job's frozen settings."""
        return settings_from_dict(self.find(job_id).config).settings

    # -- running -------------------------------------------------------------
    def recover(self) -> list[str]:
        """Jobs left "running" by a process that died: back to waiting (from their newest state folder when
        they saved state), else failed with the reason. Returns a line per job."""
        def change(jobs: list[Job]) -> list[str]:
            notes = []
            for i, job in enumerate(jobs):
                if job.state != "running" or _alive(job):
                    continue
                jobs[i], note = _recovered(job)
                notes.append(note)
            return notes

        return self._change(change)

    def claim_next(self) -> Job | None:
        """Mark the first waiting job running (for this process) and return it. A job whose check now finds
        errors is marked failed, naming them, and the next one is taken."""
        while True:
            job = next((j for j in self.jobs() if j.state == "waiting"), None)
            if job is None:
                return None
            errors = self._check(job.settings())
            if not errors:
                return self.update(job.id, state="running", pid=os.getpid(), reason="")
            self.update(job.id, state="failed", reason="the check found errors: " + "; ".join(errors))

    def update(self, job_id: str, **changes) -> Job:
        def change(jobs: list[Job]) -> Job:
            index = _index(jobs, job_id)
            jobs[index] = replace(jobs[index], **changes)
            return jobs[index]

        return self._change(change)

    def end(self, job_id: str, status: str, error: str = "") -> Job:
        """Record how a run ended ("finished", "stopped", else failed)."""
        state = {"finished": "done", "stopped": "stopped"}.get(status, "failed")
        reason = "" if state == "done" else (error or status)
        return self.update(job_id, state=state, reason=reason, pid=0, resume="")


def _index(jobs: list[Job], job_id: str) -> int:
    for i, job in enumerate(jobs):
        if job.id == job_id:
            return i
    raise QueueError(f"no job {job_id} in the queue")


def _alive(job: Job) -> bool:
    return bool(job.pid) and job.pid != os.getpid() and pid_alive(job.pid)


def _recovered(job: Job) -> tuple[Job, str]:
    if not job.config.get("save_state"):
        return replace(job, state="failed", reason=DIED_WITHOUT_STATE, pid=0), f"{job.name}: failed ({DIED_WITHOUT_STATE})"
    state = newest_state(job.config)
    where = f"from {state}" if state else "from the start (no state folder was saved yet)"
    return replace(job, state="waiting", pid=0, resume=state), f"{job.name}: goes on {where}"


@dataclass
class JobProgress:
    """An event sink that records a job's steps and time on disk (at most every PROGRESS_EVERY_S)."""

    queue: JobQueue
    job: Job
    began: float = field(default_factory=time.monotonic)
    written: float = 0.0

    def __call__(self, event) -> None:
        kind = type(event).__name__
        if kind == "Started":
            self._write(event.start_step, event.total_steps)
        elif kind == "Step" and time.monotonic() - self.written >= PROGRESS_EVERY_S:
            self._write(event.step, event.total_steps)

    def _write(self, step: int, total: int) -> None:
        self.written = time.monotonic()
        try:
            self.queue.update(self.job.id, step=int(step), total_steps=int(total), elapsed_s=self.elapsed_s())
        except (OSError, QueueError) as exc:  # the queue's figures lag; the run itself goes on
            log.warning("could not record the progress of job %s: %s", self.job.name, exc)

    def elapsed_s(self) -> float:
        return round(self.job.elapsed_s + time.monotonic() - self.began, 1)


def run_job(queue: JobQueue, job: Job, train_fn: Callable[[Any, Callable], Any], sink: Callable = lambda e: None) -> Job:
    """Train one claimed job with ``train_fn(settings, sink)`` and record how it ended."""
    progress = JobProgress(queue, job)

    def both(event) -> None:
        progress(event)
        sink(event)

    try:
        result = train_fn(job.settings(), both)
    except Exception as exc:  # recorded on the job; the queue goes on with the next one
        return queue.end(job.id, "failed", f"{type(exc).__name__}: {exc}")
    status, error = getattr(result, "status", "failed"), getattr(result, "error", None) or ""
    step = getattr(result, "step", 0) or 0
    queue.update(job.id, elapsed_s=progress.elapsed_s(), **({"step": step} if step else {}))
    return queue.end(job.id, status, error)
