"""Import what loading and training a model needs (torch and Nekoya's lean models), once.

Training imports no diffusers or transformers (see :mod:`trainer.models`), so this
is torch, safetensors and the model modules: about 1.5 s on a small CPU. The GUI
runs it on a background thread once the page is up, so its first Start skips it.
"""
from __future__ import annotations

import threading

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
