"""Start/Stop TensorBoard (kohya_ss's buttons of that name) on the Logging folder, in the run column.

Start runs ``tensorboard --logdir <logging_dir> --port 6006 --host 127.0.0.1`` as a subprocess and shows its
link; ``TENSORBOARD_PORT`` and ``TENSORBOARD_HOST`` override the port and address, as in kohya_ss (whose
default address is every interface; Nekoya's is this machine only). Stop ends it; so does the GUI's exit.
One TensorBoard per GUI: Start on another folder replaces it. The decisions are plain Python
(``TensorBoardServer``), with the process runner injectable so tests never listen on a port.
"""
from __future__ import annotations

import atexit
import html
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

DEFAULT_PORT = "6006"
DEFAULT_HOST = "127.0.0.1"
ANY_ADDRESS = ("0.0.0.0", "::", "")
SETTLE_S = 3.0  # how long Start waits to see TensorBoard fail at once (a port in use, a bad folder)
INSTALL_COMMAND = f"{sys.executable} -m pip install tensorboard"


def tensorboard_executable() -> str | None:
    """The ``tensorboard`` of Nekoya's own environment (next to its python), else the one on PATH."""
    name = "tensorboard.exe" if os.name == "nt" else "tensorboard"
    folder = Path(sys.executable).parent
    for candidate in (folder / name, folder / "Scripts" / name):
        if candidate.is_file():
            return str(candidate)
    return shutil.which("tensorboard")


def port_and_host(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    env = os.environ if environ is None else environ
    return (env.get("TENSORBOARD_PORT", "").strip() or DEFAULT_PORT,
            env.get("TENSORBOARD_HOST", "").strip() or DEFAULT_HOST)


def tensorboard_command(executable: str, logging_dir: str, environ: Mapping[str, str] | None = None) -> list[str]:
    port, host = port_and_host(environ)
    return [executable, "--logdir", logging_dir, "--port", port, "--host", host]


def tensorboard_url(environ: Mapping[str, str] | None = None, page_host: str | None = None) -> str:
    """The link to show: TensorBoard's address, or the page's own host when it listens on every address."""
    port, host = port_and_host(environ)
    if host in ANY_ADDRESS:
        host = page_host or DEFAULT_HOST
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


@dataclass(frozen=True)
class Reply:
    html: str
    running: bool


class TensorBoardServer:
    """The TensorBoard this GUI started, if any. ``runner`` starts a process as ``subprocess.Popen`` does."""

    def __init__(self, runner: Callable[..., Any] = subprocess.Popen,
                 find: Callable[[], str | None] = tensorboard_executable,
                 environ: Mapping[str, str] | None = None, settle_s: float = SETTLE_S) -> None:
        self.runner, self.find, self.environ, self.settle_s = runner, find, environ, settle_s
        self.process: Any = None
        self.logdir: str | None = None
        self.command: list[str] | None = None
        self._log: Any = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, logging_dir: str, page_host: str | None = None) -> Reply:
        folder = str(logging_dir or "").strip()
        if not folder:
            return Reply(_problem("Set the Logging folder (Folders tab) first: TensorBoard shows the logs written "
                                  "there."), self.running)
        executable = self.find()
        if executable is None:
            return Reply(_problem(f"TensorBoard is not installed: install it with: {INSTALL_COMMAND}"), self.running)
        folder = os.path.abspath(os.path.expanduser(folder))
        with self._lock:
            if self.running and self.logdir == folder:
                return Reply(self._link_html("TensorBoard is running", page_host), True)
            self._end()
            self.command = tensorboard_command(executable, folder, self.environ)
            self._log = tempfile.TemporaryFile(prefix="nekoya-tensorboard-")
            env = {**(os.environ if self.environ is None else self.environ), "TF_ENABLE_ONEDNN_OPTS": "0"}
            try:
                self.process = self.runner(self.command, stdin=subprocess.DEVNULL, stdout=self._log,
                                           stderr=subprocess.STDOUT, env=env)
            except OSError as exc:
                self._end()
                return Reply(_problem(f"TensorBoard could not start: {exc.strerror or exc}"), False)
            self.logdir = folder
            try:
                code = self.process.wait(timeout=self.settle_s)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                said = self._output_tail()
                self._end()
                return Reply(_problem(f"TensorBoard stopped at once (exit code {code})" + (f": {said}" if said else "")),
                             False)
        note = "" if os.path.isdir(folder) else " (no logs there yet: they show once a run writes them)"
        return Reply(self._link_html(f"TensorBoard started on {folder}{note}", page_host), True)

    def stop(self) -> Reply:
        with self._lock:
            if not self.running:
                self._end()
                return Reply(_message("TensorBoard is not running."), False)
            self._end()
        return Reply(_message("TensorBoard stopped."), False)

    def _end(self) -> None:
        process, self.process, self.logdir = self.process, None, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _output_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        lines = [line for line in self._log.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return " / ".join(lines[-3:])

    def _link_html(self, text: str, page_host: str | None) -> str:
        url = tensorboard_url(self.environ, page_host)
        link = f'<a href="{html.escape(url)}" target="_blank" rel="noopener">{html.escape(url)}</a>'
        return f'<ul class="nk-status"><li class="nk-ok">{html.escape(text)}: {link}</li></ul>'


def _message(text: str) -> str:
    return f'<ul class="nk-status"><li class="nk-ok">{html.escape(text)}</li></ul>'


def _problem(text: str) -> str:
    return f'<ul class="nk-status"><li class="nk-error">{html.escape(text)}</li></ul>'


SERVER = TensorBoardServer()  # the GUI's one TensorBoard
atexit.register(lambda: SERVER.stop())


# ---- the widgets -------------------------------------------------------------------------------------------


@dataclass
class TensorBoardPanel:
    start: Any
    stop: Any
    status: Any


def build_tensorboard_panel() -> TensorBoardPanel:
    import gradio as gr

    from .tab_common import status_box

    with gr.Row(equal_height=True, elem_classes=["nk-small-buttons"]):
        start = gr.Button("Start TensorBoard", size="sm", elem_id="start_tensorboard", scale=1, min_width=150)
        stop = gr.Button("Stop TensorBoard", size="sm", elem_id="stop_tensorboard", scale=1, min_width=150)
    return TensorBoardPanel(start, stop, status_box("tensorboard_status"))


def wire_tensorboard(panel: TensorBoardPanel, logging_dir: Any, server: TensorBoardServer | None = None) -> None:
    """``logging_dir``: the form's Logging folder widget."""
    import gradio as gr

    def on_start(folder, request: gr.Request = None):
        return (server or SERVER).start(folder, _page_host(request)).html

    def on_stop():
        return (server or SERVER).stop().html

    panel.start.click(on_start, inputs=logging_dir, outputs=panel.status, show_progress="minimal")
    panel.stop.click(on_stop, outputs=panel.status, show_progress="hidden")


def _page_host(request: Any) -> str | None:
    """The host name the page was opened with (for a TensorBoard that listens on every address)."""
    try:
        return request.url.hostname if request is not None else None
    except AttributeError:
        return None
