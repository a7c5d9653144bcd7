"""Torch's process-wide switches, set once per process and never changed by a run.

TF32 matmuls (free speed on Ampere and later GPUs, no visible quality loss) used to be switched on
by each run from its worker thread, so Try it computed differently before and after the first run.
Now the first device lease taken in the process (``trainer.device_lease``: a training run, an image job)
switches them on, once, for every thread alike. The CPU thread count is a run's setting, so the CPU's
lease owns it. Imported without torch, so the GUI page still starts without it.
"""
from __future__ import annotations

import threading

_lock = threading.Lock()
_applied = False


def apply_process_settings() -> None:
    """Switch on TF32 matmuls for the whole process; later calls do nothing."""
    global _applied
    with _lock:
        if _applied:
            return
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        _applied = True
