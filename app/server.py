"""Serve the GUI: ``launch_app`` is what ``launch.py`` calls after checking its flags."""
from __future__ import annotations

import logging
from typing import Any

from gradio.routes import App, ORJSONResponse

from trainer.model_libraries import stay_offline, warm_up_in_background

from .host_guard import HostGuard, HostPolicy, host_policy
from .login import FIRST_WAIT_S, FREE_FAILURES, LoginThrottle
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
    allowed_hosts: list[str] = (),
    defaults: Any = None,
) -> int:
    """Build and serve the GUI until Ctrl+C; returns the process exit code."""
    stay_offline()
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in QUIET_LOGGERS:  # one line per HTTP request otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    runs = RunManager()
    demo = build_app(run_manager=runs, headless=headless, defaults=defaults)
    warm_up_in_background()  # torch/diffusers import while the page loads: the first Start is quicker
    demo.queue(default_concurrency_limit=4)
    policy = host_policy(host, login=auth is not None, share=share, extra_hosts=list(allowed_hosts))
    try:
        demo.launch(
            _app=GuardedApp(policy),  # gradio.Server's hook for a ready-made app: gradio adds its routes to it
            server_name=host,
            server_port=port,
            share=share,
            inbrowser=inbrowser and not headless,
            root_path=root_path,
            auth=auth,
            auth_message=LOGIN_MESSAGE if auth else None,
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


LOGIN_MESSAGE = (f"After {FREE_FAILURES} wrong passwords this address must wait {FIRST_WAIT_S:.0f} s, "
                 "then twice as long after each further one.")


class GuardedApp(App):
    """Gradio's app with Nekoya's guards outside all of gradio's own middleware.

    Outside, so that a refused request never reaches gradio's CORS middleware, which answers
    preflights itself and echoes any Origin when the Host is not a localhost name.
    """

    def __init__(self, policy: HostPolicy):
        self.host_policy = policy
        self.login_throttle = LoginThrottle()
        super().__init__(default_response_class=ORJSONResponse)  # what gradio gives the app it builds

    def build_middleware_stack(self):
        return HostGuard(self.login_throttle.middleware(super().build_middleware_stack()), self.host_policy)
