"""``python -m trainer train``: the GUI's training entry point with a terminal progress bar.

Ctrl+C asks for a clean stop (the run saves what it has at the next step
boundary); a second Ctrl+C aborts at once. When a full disk kept the trained
LoRA in memory, the command asks where to save it.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, TextIO

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_STOPPED = 130  # the shell's code for "ended by Ctrl+C"


class ProgressPrinter:
    """An event sink that draws a tqdm bar (postfix loss/avg/lr) and prints everything else above it."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self.bar = None
        self.failed = False

    def __call__(self, event) -> None:
        handler = getattr(self, "_on_" + type(event).__name__, None)
        if handler is not None:
            handler(event)

    def write(self, text: str, file: TextIO | None = None) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=file or self.out)

    def _on_Started(self, e) -> None:
        from tqdm import tqdm

        self.write(e.plan)
        self.write(f"device: {e.device}" + (f"; resuming at step {e.start_step}" if e.start_step else ""))
        self.bar = tqdm(total=e.total_steps, initial=e.start_step, desc="steps", unit="step", file=self.err,
                        dynamic_ncols=True)

    def _on_Step(self, e) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={e.loss:.4f} avg={e.avg_loss:.4f} lr={e.lr:.3g} epoch={e.epoch}/{e.total_epochs}",
                                     refresh=False)
            self.bar.update(e.step - self.bar.n)

    def _on_EpochEnd(self, e) -> None:
        self.write(f"epoch {e.epoch}/{e.total_epochs}: average loss {e.avg_loss:.4f}")

    def _on_Saved(self, e) -> None:
        self.write(f"saved {e.kind}: {e.path}")

    def _on_DiskFull(self, e) -> None:
        self.write(f"disk full: {e.advice}", self.err)

    def _on_Log(self, e) -> None:
        self.write(("warning: " if e.level == "warning" else "") + e.message, self.err if e.level == "warning" else None)

    def _on_Error(self, e) -> None:
        self.failed = True
        self.close()
        where = f" (setting: {e.field})" if e.field else ""
        self.write(f"error: {e.message}{where}", self.err)
        if e.hint:
            self.write(e.hint, self.err)

    def _on_Finished(self, e) -> None:
        self.close()
        self.write(f"finished after {e.step} steps. Files:")
        for path in e.files:
            self.write(f"  {path}")

    def _on_Stopped(self, e) -> None:
        self.close()
        self.write(f"stopped at step {e.step}. Saved:")
        for path in e.files:
            self.write(f"  {path}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(settings, out: TextIO | None = None, err: TextIO | None = None, ask: Callable[[str], str] | None = None) -> int:
    """Train with a progress bar; 0 when finished, 130 when stopped by Ctrl+C, 1 on failure.

    When a full disk kept the LoRA in memory, ``ask`` (``input`` on a terminal) is asked where to save it."""
    from trainer.control import Control
    from trainer.loop import train

    from trainer.distributed.rules import in_worker

    out, err = out or sys.stdout, err or sys.stderr
    printer = ProgressPrinter(out, err)
    if in_worker():  # one process of a torchrun group
        from trainer.distributed.worker import run_worker

        # a stopped worker exits 0: torchrun takes any other code for a failure and ends the group
        return EXIT_FAILED if run_worker(settings, printer) == "failed" else EXIT_OK
    control = Control()
    with _ctrl_c_requests_stop(control, printer):
        result = train(settings, printer, control)
    if control.kept_weights is not None:
        _save_kept(control, printer, ask or (input if sys.stdin.isatty() else None))
    return {"finished": EXIT_OK, "stopped": EXIT_STOPPED}.get(result.status, EXIT_FAILED)


def _save_kept(control, printer: ProgressPrinter, ask: Callable[[str], str] | None) -> None:
    """Ask for a folder or file on another disk until the kept LoRA is saved there, or the user gives up."""
    from trainer.safety import SaveError

    if ask is None:
        printer.write("the trained LoRA was only in memory and is lost: run in a terminal to be asked where to "
                      "save it", printer.err)
        return
    while True:
        try:
            answer = ask("Save the trained LoRA to (a folder or file on another disk; empty to discard): ").strip()
        except EOFError:
            answer = ""
        if not answer:
            printer.write("the trained LoRA was not saved", printer.err)
            return
        try:
            printer.write(f"saved: {control.save_kept_to(os.path.expanduser(answer))}")
            return
        except SaveError as exc:
            printer.write(f"error: {exc}", printer.err)


class _ctrl_c_requests_stop:
    """First Ctrl+C: request a clean stop. Second: the default behaviour (KeyboardInterrupt)."""

    def __init__(self, control, printer: ProgressPrinter) -> None:
        self.control, self.printer = control, printer
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.printer.write("stopping after this step and saving what exists (Ctrl+C again to abort)", self.printer.err)
        self.control.request_stop()
        signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
