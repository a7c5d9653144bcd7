"""After a failure mid-run (NaN stop, out of memory...): keep the trained steps, finite weights only; when the
disk is full, in memory until ``Control.save_kept_to`` writes them elsewhere."""
from __future__ import annotations

from typing import Callable

from trainer import events as ev
from trainer.control import Control
from trainer.safety import disk_full_advice, free_bytes, is_disk_full
from trainer.saving import RunOutputs


def keep_after_failure(outputs: RunOutputs, step: int, epoch: int, kind: str, snapshot_every: int, control: Control,
                       sink: ev.EventSink) -> None:
    """Save the LoRA of ``step`` (or the last finite copy) as ``kind`` ("final" or "stopped"). Never raises:
    the failure being reported matters more than this one."""
    log: Callable[[str, str], None] = lambda message, level: sink(ev.Log(message, level))  # noqa: E731
    weights = None
    try:
        weights = outputs.weights_to_keep(step, epoch, kind)
        if weights is None or weights.step != step:
            kept = (f"the last finite weights, of step {weights.step}, are kept" if weights else "no finite "
                    f"weights were kept (they are copied every {snapshot_every} steps and at each save)")
            log(f"the LoRA weights are NaN or infinite at step {step}, so they are not saved; {kept}", "warning")
        if weights is not None and weights.saved_path is None:
            outputs.write(kind, weights)
    except Exception as exc:
        if weights is not None and is_disk_full(exc):
            _keep_in_memory(outputs, weights, exc, control, sink)
        else:
            log(f"could not save the LoRA after the failure: {exc}", "warning")


def _keep_in_memory(outputs: RunOutputs, weights, exc: Exception, control: Control, sink: ev.EventSink) -> None:
    path = getattr(exc, "path", None) or outputs.path(weights.file_name)
    free = free_bytes(path)
    control.keep(weights)
    advice = disk_full_advice(path, free, "choose another folder with Save to…") + (
        f". The LoRA of step {weights.step} is kept in memory until then")
    sink(ev.DiskFull(path, free, weights.step, advice))
