"""Import the heavy model libraries (torch, diffusers, transformers) once, quickly.

diffusers imports bitsandbytes whenever it is installed (its quantizers), which
costs about 2 s and 45 MB at start-up; Nekoya only needs bitsandbytes for the
8-bit optimizers, which import it themselves. So bitsandbytes is hidden while
diffusers' model code is first imported, and visible again right after.
"""
from __future__ import annotations

import sys
import threading

_lock = threading.Lock()


def import_model_libraries() -> None:
    """Import what loading and training a model needs. Safe to call from any thread, many times."""
    with _lock:
        if "diffusers.models.modeling_utils" in sys.modules:
            return
        # Hide bitsandbytes only if diffusers has not yet decided whether it is available.
        hide = "diffusers" not in sys.modules and "bitsandbytes" not in sys.modules
        if hide:
            sys.modules["bitsandbytes"] = None  # find_spec() -> None: diffusers sees it as absent
        try:
            import torch  # noqa: F401
            import diffusers.models.modeling_utils  # noqa: F401
            import transformers  # noqa: F401
            from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
            from transformers import CLIPTextModel  # noqa: F401
        finally:
            if hide and sys.modules.get("bitsandbytes", ...) is None:
                del sys.modules["bitsandbytes"]


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
