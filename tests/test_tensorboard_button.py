"""Start/Stop TensorBoard in the run column (kohya_ss's buttons): the command it runs on the Logging folder,
the link it shows, Stop, and what it says when TensorBoard is missing or fails. The handlers run with a
fake process runner; one slow test starts the real TensorBoard on a free local port and reads its page."""
from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from app import tensorboard_panel  # noqa: E402
from app.tensorboard_panel import INSTALL_COMMAND, TensorBoardServer, tensorboard_executable  # noqa: E402


class FakeProcess:
    def __init__(self, args, exit_code=None, output=b"", **kwargs):
        self.args, self.kwargs, self.code, self.terminated = args, kwargs, exit_code, False
        if output:
            kwargs["stdout"].write(output)

    def poll(self):
        return self.code

    def wait(self, timeout=None):
        if self.code is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.code

    def terminate(self):
        self.terminated, self.code = True, -15

    kill = terminate


class FakeRunner:
    def __init__(self, **behaviour):
        self.started: list[FakeProcess] = []
        self.behaviour = behaviour

    def __call__(self, args, **kwargs):
        process = FakeProcess(args, **self.behaviour, **kwargs)
        self.started.append(process)
        return process


def server(environ=None, **behaviour):
    runner = FakeRunner(**behaviour)
    return TensorBoardServer(runner=runner, find=lambda: "/venv/bin/tensorboard", environ=environ or {}), runner


def test_start_runs_tensorboard_on_the_logging_folder_and_shows_the_link(tmp_path):
    tb, runner = server()
    reply = tb.start(str(tmp_path))
    [process] = runner.started
    assert process.args == ["/venv/bin/tensorboard", "--logdir", str(tmp_path), "--port", "6006", "--host", "127.0.0.1"]
    assert reply.running and tb.running
    assert 'href="http://127.0.0.1:6006/"' in reply.html and f"TensorBoard started on {tmp_path}" in reply.html
    again = tb.start(str(tmp_path))  # the same folder: the one that runs, not a second
    assert len(runner.started) == 1 and "TensorBoard is running" in again.html
    stopped = tb.stop()
    assert process.terminated and not stopped.running and "TensorBoard stopped." in stopped.html
    assert "not running" in tb.stop().html


def test_port_and_host_come_from_the_environment_as_in_kohya_ss(tmp_path):
    tb, runner = server({"TENSORBOARD_PORT": "7007", "TENSORBOARD_HOST": "0.0.0.0"})
    reply = tb.start(str(tmp_path / "not yet"), page_host="gpu-box")
    assert runner.started[0].args[-4:] == ["--port", "7007", "--host", "0.0.0.0"]
    assert 'href="http://gpu-box:7007/"' in reply.html and "no logs there yet" in reply.html  # listens everywhere
    tb.stop()


def test_another_folder_replaces_the_running_tensorboard(tmp_path):
    tb, runner = server()
    tb.start(str(tmp_path / "a"))
    tb.start(str(tmp_path / "b"))
    first, second = runner.started
    assert first.terminated and not second.terminated and second.args[2] == str(tmp_path / "b")
    tb.stop()


def test_what_it_says_without_a_folder_without_tensorboard_or_when_it_fails(tmp_path):
    tb, runner = server()
    assert "Set the Logging folder" in tb.start("  ").html and not runner.started
    missing = TensorBoardServer(runner=FakeRunner(), find=lambda: None)
    reply = missing.start(str(tmp_path))
    assert "TensorBoard is not installed" in reply.html and INSTALL_COMMAND in reply.html and not reply.running
    failing, _ = server(exit_code=1, output=b"E1207 TensorBoard could not bind to port 6006, it was already in use\n")
    reply = failing.start(str(tmp_path))
    assert not reply.running and "exit code 1" in reply.html and "already in use" in reply.html


def test_the_run_column_has_the_buttons_and_they_use_the_logging_folder(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from gui_app_support import component, fresh_app, run_handlers

    tb, runner = server()
    monkeypatch.setattr(tensorboard_panel, "SERVER", tb)
    app = fresh_app(tmp_path / "presets")
    logs = tmp_path / "logs"
    (shown,) = run_handlers(app, component(app, "start_tensorboard"), "click",
                            {component(app, "setting_logging_dir"): str(logs)})
    assert runner.started[0].args[2] == str(logs) and "http://127.0.0.1:6006/" in shown
    (shown,) = run_handlers(app, component(app, "stop_tensorboard"), "click", {})
    assert "TensorBoard stopped." in shown and runner.started[0].terminated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # starts the real TensorBoard (a subprocess listening on 127.0.0.1 only)
def test_the_real_tensorboard_serves_the_logging_folder(tmp_path):
    if tensorboard_executable() is None:
        pytest.skip("tensorboard is not installed")
    port = str(_free_port())
    tb = TensorBoardServer(environ={**os.environ, "TENSORBOARD_PORT": port, "TENSORBOARD_HOST": "127.0.0.1"})
    reply = tb.start(str(tmp_path))
    try:
        assert reply.running, reply.html
        deadline, page = time.monotonic() + 60, None
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to this machine
        while page is None and time.monotonic() < deadline:
            try:
                with no_proxy.open(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    page = response.read()
            except OSError:
                time.sleep(0.5)
        assert page is not None and b"TensorBoard" in page
    finally:
        process = tb.process
        tb.stop()
    assert process.poll() is not None and not tb.running
