"""Import what loading and training a model needs (torch and Nekoya's lean models), once.

Training imports no diffusers or transformers (see :mod:`trainer.models`), so this
is torch, safetensors and the model modules: about 1.5 s on a small CPU. The GUI
runs it on a background thread once the page is up, so its first Start skips it.

``stay_offline`` is what every entry point (CLI, GUI launcher) calls first: Nekoya never
downloads, so no library may look anything up on the network.
"""
from __future__ import annotations

import logging
import os
import threading

# Read once by huggingface_hub / transformers / gradio when they are imported. HF_HUB_OFFLINE also
# keeps bitsandbytes' CPU backend from asking the Hub (through the ``kernels`` package) for an
# optional 4-bit kernel as soon as it is imported: two DNS lookups of huggingface.co per run.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DO_NOT_TRACK": "1",
}
# logger -> start of a known-harmless line: bitsandbytes falls back to its own CPU code for 4-bit
# matmuls, which Nekoya does not use (its 8-bit optimizers need no kernel from the Hub)
HARMLESS_LIBRARY_LINES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "kernels._internals.hf_hub": "Skipping publisher trust check",
}

_lock = threading.Lock()


def import_model_libraries() -> None:
    """Safe to call from any thread, many times."""
    with _lock:
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401

        import trainer.models.clip_text  # noqa: F401
        import trainer.models.clip_tokenizer  # noqa: F401
        import trainer.models.unet  # noqa: F401
        import trainer.models.vae  # noqa: F401


def warm_up_in_background() -> threading.Thread:
    """Start the imports on a daemon thread (the GUI does this so its first Start is quick)."""
    thread = threading.Thread(target=_quietly, name="nekoya-import", daemon=True)
    thread.start()
    return thread


def _quietly() -> None:
    try:
        import_model_libraries()
    except Exception:  # the real import, later, reports any problem where it matters
        pass


def stay_offline() -> None:
    """Set the offline environment and hide the known-harmless library lines; before heavy imports."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    for logger_name, start in HARMLESS_LIBRARY_LINES.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropLinesStartingWith) for f in logger.filters):
            logger.addFilter(_DropLinesStartingWith(start))


class _DropLinesStartingWith(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)
