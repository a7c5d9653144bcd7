"""One training run at a time, in a background thread, with its state kept server-side.

The GUI process owns one ``RunManager``. Browsers come and go (closing or
reloading a page never touches the run); every page polls ``snapshot()``. The
trainer reports through events only; ``RunState.apply`` folds them into the
state a page shows.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable

from app.loss_history import LossHistory, LossPoints
from trainer.control import Control
from trainer.job_queue import JobProgress
from trainer.events import (DiskFull, EpochEnd, Error, Finished, Log, Memory, Paused, Resumed, Sample, Saved, Started, Step,
                            Stopped)

log = logging.getLogger(__name__)

TrainFn = Callable[[Any, Callable[[Any], None], Control], Any]
LOG_LINES = 300
ACTIVE = ("starting", "running", "stopping", "pausing", "paused")
STOPPING_MESSAGE = "Stopping after the current step; the LoRA trained so far is saved."
ENDED = ("finished", "stopped")  # a run that "Train more" can extend
LORA_KINDS = ("final", "stopped", "step", "epoch")
# Loggers that do not propagate to the root logger (the libraries set propagate=False once imported).
LIBRARY_LOGGERS = ("", "diffusers", "transformers")


@dataclass(frozen=True)
class RunSnapshot:
    """Everything a page shows about the current (or last) run. Immutable: safe to render anywhere."""

    run_id: int = 0
    status: str = "idle"  # idle, starting, running, pausing, paused, stopping, finished, stopped, error
    version: int = 0  # bumps on every change, so pages can skip re-rendering what did not change
    started: Started | None = None
    last_step: Step | None = None
    memory: Memory | None = None
    losses: LossPoints = LossPoints()  # (step, loss, smoothed loss) per step
    epochs: tuple[EpochEnd, ...] = ()
    saved: tuple[Saved, ...] = ()
    samples: tuple[Sample, ...] = ()
    log: tuple[str, ...] = ()
    error: Error | None = None
    paused: Paused | None = None  # while paused: the last Paused event (its note says what the pause did)
    disk_full: DiskFull | None = None  # a full disk ended the run; its LoRA waits in memory for "Save to…"
    kept_saved_to: str = ""  # where "Save to…" wrote that LoRA
    began_at: float | None = None  # time.time()
    ended_at: float | None = None
    output_name: str = ""

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def step(self) -> int:
        return self.last_step.step if self.last_step else (self.started.start_step if self.started else 0)

    @property
    def total_steps(self) -> int:
        if self.last_step:
            return self.last_step.total_steps
        return self.started.total_steps if self.started else 0

    @property
    def progress(self) -> float:
        """0..1; a finished run is complete even if the last Step event was skipped."""
        if self.status == "finished":
            return 1.0
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def elapsed_s(self, now: float | None = None) -> float:
        if self.began_at is None:
            return 0.0
        return (self.ended_at or now or time.time()) - self.began_at


class RunState:
    """Folds events into a ``RunSnapshot``; called from the training thread, read from the GUI."""

    def __init__(self, run_id: int, output_name: str = "", log_lines: int = LOG_LINES):
        self._lock = threading.Lock()
        self._snap = RunSnapshot(run_id=run_id, status="starting", began_at=time.time(), output_name=output_name)
        self._losses = LossHistory()
        self._log: deque[str] = deque(maxlen=log_lines)
        self._handlers: dict[type, Callable[[Any], dict]] = {
            Started: self._on_started, Step: self._on_step, EpochEnd: self._on_epoch_end, Saved: self._on_saved,
            Sample: self._on_sample, Log: self._on_log, Error: self._on_error, Finished: self._on_finished,
            Stopped: self._on_stopped, Memory: lambda e: {"memory": e}, DiskFull: self._on_disk_full,
            Paused: self._on_paused, Resumed: self._on_resumed,
        }

    def apply(self, event: Any) -> None:
        """The trainer's event sink."""
        handler = self._handlers.get(type(event))
        if handler is None:
            return  # an event type this GUI does not know yet: ignore rather than crash the run
        with self._lock:
            changes = handler(event)
            self._snap = replace(self._snap, version=self._snap.version + 1, **changes)

    def set_status(self, status: str, message: str | None = None) -> None:
        with self._lock:
            if message:
                self._log.append(message)
            self._snap = replace(self._snap, status=status, version=self._snap.version + 1, log=tuple(self._log))

    def end(self) -> None:
        """The training thread returned: settle the status if no final event said how it ended."""
        with self._lock:
            status = self._snap.status
            if status in ACTIVE:
                done = self._snap.total_steps and self._snap.step >= self._snap.total_steps
                status = "finished" if done else "stopped"
            self._snap = replace(self._snap, status=status, ended_at=time.time(), version=self._snap.version + 1)

    def snapshot(self) -> RunSnapshot:
        with self._lock:
            return self._snap

    # -- one handler per event type: returns the fields that change ---------
    def _on_started(self, e: Started) -> dict:
        self._log.append(f"Started on {e.device}: {e.plan}")
        return {"started": e, "status": self._running_status(), "log": tuple(self._log)}

    def _on_step(self, e: Step) -> dict:
        self._losses.append((e.step, e.loss, e.avg_loss))
        return {"last_step": e, "memory": e.memory, "losses": self._losses.view(), "status": self._running_status()}

    def _on_epoch_end(self, e: EpochEnd) -> dict:
        self._log.append(f"Epoch {e.epoch}/{e.total_epochs} done, average loss {e.avg_loss:.4f}")
        return {"epochs": (*self._snap.epochs, e), "log": tuple(self._log)}

    def _on_saved(self, e: Saved) -> dict:
        self._log.append(f"Saved {e.path} ({e.kind}, step {e.step})")
        return {"saved": (*self._snap.saved, e), "log": tuple(self._log)}

    def _on_sample(self, e: Sample) -> dict:
        return {"samples": (*self._snap.samples, e)}

    def _on_log(self, e: Log) -> dict:
        self._log.append(e.message if e.level == "info" else f"{e.level}: {e.message}")
        return {"log": tuple(self._log)}

    def _on_paused(self, e: Paused) -> dict:
        self._log.append(f"Paused at step {e.step}: {e.note}." if e.note else f"Paused at step {e.step}.")
        status = "stopping" if self._snap.status == "stopping" else "paused"
        return {"paused": e, "status": status, "log": tuple(self._log)}

    def _on_resumed(self, e: Resumed) -> dict:
        self._log.append(f"Resumed at step {e.step} after {e.paused_s:.0f} s paused (left out of it/s and ETA).")
        return {"paused": None, "status": self._running_status(), "log": tuple(self._log)}

    def _on_error(self, e: Error) -> dict:
        self._log.append(f"error: {e.message}")
        return {"error": e, "status": "error", "log": tuple(self._log)}

    def _on_disk_full(self, e: DiskFull) -> dict:
        self._log.append(f"warning: {e.advice}")
        return {"disk_full": e, "log": tuple(self._log)}

    def kept_saved(self, path: str) -> None:
        with self._lock:
            self._log.append(f"Saved the kept LoRA to {path}")
            self._snap = replace(self._snap, kept_saved_to=path, log=tuple(self._log), version=self._snap.version + 1)

    def _on_finished(self, e: Finished) -> dict:
        self._log.append(f"Finished at step {e.step}.")
        return {"status": "finished", "log": tuple(self._log), **self._files(e.files)}

    def _on_stopped(self, e: Stopped) -> dict:
        self._log.append(f"Stopped at step {e.step}.")
        return {"status": "stopped", "log": tuple(self._log), **self._files(e.files)}

    def _running_status(self) -> str:
        """Steps go on while a stop or a pause waits for the step boundary."""
        return self._snap.status if self._snap.status in ("stopping", "pausing") else "running"

    def _files(self, files: tuple[str, ...]) -> dict:
        """Files a final event lists that no Saved event announced (so the page lists every file)."""
        known = {s.path for s in self._snap.saved}
        step = self._snap.step
        epoch = self._snap.last_step.epoch if self._snap.last_step else 0
        extra = tuple(Saved(path=f, kind="final", step=step, epoch=epoch) for f in files if f not in known)
        return {"saved": self._snap.saved + extra} if extra else {}


class RunManager:
    """Starts, stops and reports the one training run of this GUI process, and runs the job queue's waiting
    jobs one after another when one is attached (``attach_queue``)."""

    def __init__(self, train_fn: TrainFn | None = None):
        self._train_fn = train_fn or train_in_process
        self._lock = threading.Lock()
        self._queue_lock = threading.Lock()  # one claim of the next job at a time
        self.queue: Any = None  # trainer.job_queue.JobQueue
        self._job: Any = None  # the queue job the current run trains
        self._state: RunState | None = None
        self._control: Control | None = None
        self._thread: threading.Thread | None = None
        self._runs = 0
        self._settings: Any = None

    @property
    def settings(self) -> Any:
        """The settings of the current (or last) run."""
        return self._settings

    def start(self, settings: Any, notes: tuple[str, ...] = (), job: Any = None) -> tuple[bool, str]:
        """Start a run (``notes`` open its log; ``job``: the queue job it trains); refused (False, why) while
        one is going."""
        with self._lock:
            if self._is_alive():
                return False, self.start_refusal()
            self._runs += 1
            self._settings, self._job = settings, job
            self._state = RunState(self._runs, output_name=getattr(settings, "output_name", ""))
            for note in notes:
                self._state.apply(Log(note))
            self._control = Control()
            self._thread = threading.Thread(
                target=self._run, args=(settings, self._state, self._control, job), name=f"nekoya-run-{self._runs}",
                daemon=True,
            )
            self._thread.start()
        return True, "Training started."

    def start_refusal(self) -> str:
        """Why another Start waits: the run that is going, at its real step (before its first event it is starting)."""
        snap = self.snapshot()
        where = f"at step {snap.step} / {snap.total_steps}" if snap.total_steps else "starting"
        return f"A training run is already going ({where}): stop it to start another."

    def stop(self) -> str:
        with self._lock:
            if not self._is_alive():
                return "No training is running."
            self._control.request_stop()
            self._state.set_status("stopping", "Stop requested: the trainer saves what it has after this step.")
        return STOPPING_MESSAGE

    def pause(self, free_memory: bool = False) -> str:
        """Pause at the next step boundary (``free_memory``: weights to the CPU until Resume)."""
        with self._lock:
            if not self._is_alive():
                return "No training is running."
            if self._state.snapshot().status == "stopping":
                return STOPPING_MESSAGE
            self._control.request_pause(free_memory)
            if self._state.snapshot().status != "paused":
                self._state.set_status("pausing", "Pause requested: the run waits after the current step.")
        if free_memory:
            return "Pausing after the current step; the weights move to the CPU until you press Resume."
        return "Pausing after the current step; the model stays loaded until you press Resume."

    def resume(self) -> str:
        with self._lock:
            if not self._is_alive():
                return "No training is running."
            status = self._state.snapshot().status
            if status not in ("pausing", "paused"):
                return "The run is not paused."
            self._control.request_resume()
            if status == "pausing":  # resumed before the step boundary: no pause happens
                self._state.set_status("running", "Pause cancelled.")
        return "Resuming."

    def train_more(self, amount: int, unit: str) -> tuple[bool, str]:
        """Extend the last run (finished or stopped) by ``amount`` "steps" or "epochs": from its newest state
        folder, else from its LoRA file with a fresh optimizer (``trainer.extend``)."""
        from trainer.extend import ExtendError, extend_run, keep_previous_final  # torch-free

        snap, settings = self.snapshot(), self._settings
        if self.busy:
            return False, self.start_refusal()
        if settings is None or snap.status not in ENDED:
            return False, "Train more goes on from a run that finished or was stopped."
        source = extend_source(snap)
        if source is None:
            return False, "The last run saved no LoRA file or training state to go on from."
        try:
            extension = extend_run(settings, source, **{unit: int(amount)})
        except (ExtendError, TypeError) as exc:
            return False, str(exc)
        kept = keep_previous_final(extension.settings, extension)
        started, text = self.start(extension.settings, (*extension.notes, *([kept] if kept else [])))
        return started, " ".join(extension.notes[:1]) + "." if started else text

    def request_save(self) -> str:
        if self._state is not None and self._state.snapshot().status == "paused":
            return self._request(lambda c: c.request_save(), "The paused run saves its LoRA now; Try it lists it.")
        return self._request(lambda c: c.request_save(), "The trainer saves the LoRA after the current step.")

    def request_sample(self) -> str:
        return self._request(lambda c: c.request_sample(), "The trainer makes samples (Samples tab prompts) after the current step.")

    def save_kept_to(self, path: str) -> tuple[bool, str]:
        """After a full disk ended the run: write the LoRA it kept in memory to ``path`` (a folder, or a
        file name). Never replaces an existing file; a failure leaves the weights kept for another try."""
        from trainer.safety import SaveError  # torch-free

        with self._lock:
            kept = self._control.kept_weights if self._control and not self._is_alive() else None
            state = self._state
        if kept is None:
            return False, "No trained LoRA is waiting to be saved."
        if not path.strip():
            return False, "Save to…: type a folder (or a .safetensors file name) on a disk with free space."
        target = kept.target(os.path.expanduser(path.strip()))
        if os.path.exists(target):
            return False, f"{target} exists already: choose another folder or file name."
        try:
            written = kept.save_to(target)
        except SaveError as exc:
            return False, str(exc)
        state.kept_saved(written)
        return True, f"Saved the LoRA of step {kept.step} to {written}."

    def snapshot(self) -> RunSnapshot:
        state = self._state
        return state.snapshot() if state else RunSnapshot()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current run ends (tests, shutdown); True when nothing is running."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self._is_alive()

    @property
    def busy(self) -> bool:
        return self._is_alive()

    def _is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _request(self, action: Callable[[Control], None], message: str) -> str:
        with self._lock:
            if not self._is_alive():
                return "No training is running."
            action(self._control)
        return message

    # -- the job queue ------------------------------------------------------------------------------
    def attach_queue(self, queue: Any) -> list[str]:
        """Run ``queue``'s jobs from now on: those a dead app left running first (``JobQueue.recover``), then
        the waiting ones. Returns what recovery did, a line per job."""
        self.queue = queue
        try:
            notes = queue.recover()
        except Exception as exc:  # an unreadable queue file must not keep the app from starting
            log.error("the job queue is not run: %s", exc)
            return []
        for note in notes:
            log.info("queue: %s", note)
        self.run_queue()
        return notes

    def run_queue(self) -> tuple[bool, str]:
        """Start the queue's next waiting job, unless a run is going."""
        if self.queue is None:
            return False, "No job queue."
        with self._queue_lock:
            if self._is_alive():
                return False, "The queue's next job starts when this run ends."
            job = self.queue.claim_next()  # checks it again: a job that fails the check is marked failed
            if job is None:
                return False, "No job is waiting in the queue."
            notes = (f"Queue job {job.name}" + (f", going on from {job.resume}" if job.resume else ""),)
            started, text = self.start(job.settings(), notes, job=job)
            if not started:
                self.queue.update(job.id, state="waiting", pid=0)
            return started, f"Started queue job {job.name}." if started else text

    def _start_next_job(self, run_thread: threading.Thread) -> None:
        run_thread.join()  # the run that ended must no longer count as going
        self.run_queue()

    def _record_job(self, job: Any, snap: RunSnapshot) -> None:
        try:
            self.queue.update(job.id, elapsed_s=round(job.elapsed_s + snap.elapsed_s(), 1),
                              **({"step": snap.step} if snap.step else {}))
            self.queue.end(job.id, snap.status, snap.error.message if snap.error else "")
        except Exception:  # a queue file that cannot be written must not take the GUI down
            log.exception("could not record the end of queue job %s", job.name)

    def _run(self, settings: Any, state: RunState, control: Control, job: Any = None) -> None:
        capture = _ThreadLogCapture(state)
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).addHandler(capture)
        sink = state.apply if job is None else _both(JobProgress(self.queue, job), state.apply)
        try:
            self._train_fn(settings, sink, control)
        except Exception as exc:  # the page must say what went wrong, not only the console
            log.exception("training failed")
            if state.snapshot().status != "error":
                state.apply(Error(message=f"{type(exc).__name__}: {exc}", hint="The console has the full traceback."))
        finally:
            for name in LIBRARY_LOGGERS:
                logging.getLogger(name).removeHandler(capture)
            state.end()
            if job is not None:
                self._record_job(job, state.snapshot())
            if self.queue is not None and state.snapshot().status != "stopped":  # Stop stops the queue too
                threading.Thread(target=self._start_next_job, args=(threading.current_thread(),),
                                 name="nekoya-queue-next", daemon=True).start()


def _both(first: Callable[[Any], None], second: Callable[[Any], None]) -> Callable[[Any], None]:
    def sink(event: Any) -> None:
        first(event)
        second(event)

    return sink


def extend_source(snap: RunSnapshot) -> str | None:
    """What "Train more" goes on from: the run's newest training state, else its newest LoRA file."""
    def newest(kinds: tuple[str, ...]) -> str | None:
        found = [s for s in snap.saved if s.kind in kinds and os.path.exists(s.path)]
        return max(found, key=lambda s: s.step).path if found else None

    return newest(("state",)) or newest(LORA_KINDS)


def train_in_process(settings: Any, sink: Callable[[Any], None], control: Control) -> Any:
    """The real trainer (imported on first use: torch and diffusers load only when a run starts)."""
    from trainer.loop import train

    return train(settings, sink, control)


class _ThreadLogCapture(logging.Handler):
    """Library warnings raised on the training thread go to the page's log tail too."""

    def __init__(self, state: RunState):
        super().__init__(level=logging.WARNING)
        self._state = state
        self._ident = threading.get_ident()  # created on the training thread itself

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._ident and record.name != __name__ and not getattr(record, "_nekoya_seen", False):
            record._nekoya_seen = True  # attached to several loggers: count each record once
            self._state.apply(Log(message=f"{record.name}: {record.getMessage()}", level="warning"))
