"""Serve the GUI: ``launch_app`` is what ``launch.py`` calls after checking its flags."""
from __future__ import annotations

import logging
import os

from trainer.model_libraries import warm_up_in_background

from .run_manager import RunManager
from .ui import build_app, launch_options

log = logging.getLogger(__name__)
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "asyncio")


def launch_app(
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    inbrowser: bool = False,
    root_path: str | None = None,
    auth: tuple[str, str] | None = None,
    headless: bool = False,
    debug: bool = False,
) -> int:
    """Build and serve the GUI until Ctrl+C; returns the process exit code."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in QUIET_LOGGERS:  # one line per HTTP request otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    runs = RunManager()
    demo = build_app(run_manager=runs, headless=headless)
    warm_up_in_background()  # torch/diffusers import while the page loads: the first Start is quicker
    demo.queue(default_concurrency_limit=4)
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            share=share,
            inbrowser=inbrowser and not headless,
            root_path=root_path,
            auth=auth,
            show_error=True,
            debug=debug,
            footer_links=[],
            **launch_options(),
        )
    except KeyboardInterrupt:
        pass
    finally:
        if runs.busy:  # Ctrl+C while training: save what exists before leaving
            log.info("Stopping the training run and saving what it has…")
            runs.stop()
            runs.wait(timeout=120)
        demo.close()
    return 0
