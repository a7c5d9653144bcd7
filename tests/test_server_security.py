"""The GUI server as launch.py starts it, attacked over HTTP: forged Host (DNS rebinding), foreign
Origin (another web site in the user's browser), password guessing; and the ways to give a password.

The servers run in subprocesses under the socket guard of test_no_network (no lookup or connection
to another machine), from an environment without offline switches, as a user's shell would be.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("gradio")
from test_no_network import REPO, guarded_environment, network_attempts  # noqa: E402

import launch  # noqa: E402

FOREIGN = "http://attacker.example"
STARTUP_TIMEOUT_S = 240
BROWSER_TIMEOUT_MS = 90_000  # waits, not a speed limit: the test machine may be busy


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class Server:
    """``python launch.py ARGS`` on a free port; ``get``/``post`` talk to it with the headers given."""

    def __init__(self, tmp_path, args: list[str], listen: str = "127.0.0.1", env: dict | None = None):
        self.port = free_port(listen)
        self.socket_log = tmp_path / "sockets.log"
        self.output = tmp_path / "server.log"
        command = [sys.executable, "launch.py", "--headless", "--listen", listen, "--server_port", str(self.port), *args]
        with open(self.output, "w") as out:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                            env={**guarded_environment(self.socket_log), **(env or {})})
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", trust_env=False, timeout=60)
        self._wait_until_up()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"launch.py exited with {self.process.returncode}:\n{self.output.read_text()[-3000:]}")
            try:
                self.client.get("/")
                return
            except httpx.TransportError:
                time.sleep(0.5)
        pytest.fail(f"launch.py did not answer within {STARTUP_TIMEOUT_S} s:\n{self.output.read_text()[-3000:]}")

    def request(self, method: str, path: str, host: str | None = None, **headers) -> httpx.Response:
        headers = {key.replace("_", "-"): value for key, value in headers.items()}
        return self.client.request(method, path, headers={"Host": host or self.host, **headers})

    def login(self, username: str, password: str) -> httpx.Response:
        return self.client.post("/login", data={"username": username, "password": password}, headers={"Host": self.host})

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def local_gui(tmp_path_factory):
    """The default launch: 127.0.0.1, no login; one extra host name from NEKOYA_ALLOWED_HOSTS."""
    server = Server(tmp_path_factory.mktemp("local_gui"), [], env={"NEKOYA_ALLOWED_HOSTS": "nekoya.lan"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lan_gui(tmp_path_factory):
    """--listen 0.0.0.0 with a login whose password comes from a file."""
    folder = tmp_path_factory.mktemp("lan_gui")
    password_file = folder / "password.txt"
    password_file.write_text("from-a-file\n")
    server = Server(folder, ["--username", "me", "--password-file", str(password_file)], listen="0.0.0.0")
    yield server
    server.stop()


# ---- DNS rebinding and cross-site requests ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/config"), ("POST", "/gradio_api/queue/join"),
                                          ("POST", "/gradio_api/upload")])
def test_a_forged_host_is_refused(local_gui, method, path):
    response = local_gui.request(method, path, host="attacker.example", origin=FOREIGN)
    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers
    assert "--allowed-hosts" in response.text  # the message says how to allow a name that is really this GUI


@pytest.mark.slow
@pytest.mark.parametrize("origin", [FOREIGN, f"http://attacker.example:{7860}", "null"])
def test_a_foreign_origin_is_refused_on_the_real_host(local_gui, origin):
    response = local_gui.request("GET", "/config", origin=origin)
    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.slow
def test_a_cross_site_preflight_is_refused(local_gui):
    for host in (local_gui.host, "attacker.example"):
        response = local_gui.request("OPTIONS", "/gradio_api/queue/join", host=host, origin=FOREIGN,
                                     access_control_request_method="POST")
        assert response.status_code == 403
        assert "access-control-allow-origin" not in response.headers


@pytest.mark.slow
@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", "[::1]", "nekoya.lan"])
def test_loopback_names_and_allowed_hosts_are_served(local_gui, name):
    host = f"{name}:{local_gui.port}"
    assert local_gui.request("GET", "/config", host=host).status_code == 200
    same_origin = local_gui.request("GET", "/config", host=host, origin=f"http://{host}")
    assert same_origin.status_code == 200


@pytest.mark.browser
def test_the_gui_page_works_through_the_guard(local_gui):
    """The page's own requests (queue, event stream, uploads) are same-origin: a preset loads in a real browser."""
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    from test_gui_browser import CHROMIUM, CHROMIUM_ARGS, pick

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(BROWSER_TIMEOUT_MS)
            page.goto(f"http://localhost:{local_gui.port}/")
            pick(page, "preset_choice", "SD15 - 8GB card")
            page.click("#preset_load")
            loaded = sync_api.expect(page.locator("#preset_status"))
            loaded.to_contain_text("Loaded 'SD15 - 8GB card'", timeout=BROWSER_TIMEOUT_MS)
        finally:
            browser.close()


@pytest.mark.slow
def test_every_address_with_a_login_accepts_any_host_but_no_foreign_origin(lan_gui):
    lan_host = f"192.0.2.7:{lan_gui.port}"  # what a user on the network types: the machine's address
    assert lan_gui.request("GET", "/", host=lan_host).status_code == 200
    assert lan_gui.request("GET", "/", host=lan_host, origin=f"http://{lan_host}").status_code == 200
    refused = lan_gui.request("GET", "/", host=lan_host, origin=FOREIGN)
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers


# ---- login --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_password_from_a_file_logs_in(lan_gui):
    assert lan_gui.request("GET", "/config").status_code == 401
    assert lan_gui.login("me", "wrong").status_code == 400
    assert lan_gui.login("me", "from-a-file").status_code == 200


@pytest.mark.slow
def test_wrong_passwords_lock_the_login(lan_gui):
    from app.login import FREE_FAILURES

    for _ in range(FREE_FAILURES):
        assert lan_gui.login("me", "guess").status_code == 400
    refused = lan_gui.login("me", "from-a-file")  # even the right password must wait now
    assert refused.status_code == 429
    assert "try again in" in refused.json()["detail"] and int(refused.headers["retry-after"]) > 0


@pytest.fixture
def launched_with(monkeypatch):
    """launch.main with the server replaced by a recorder: what launch_app would be called with."""
    import app.server

    calls = []
    monkeypatch.setattr(app.server, "launch_app", lambda **kwargs: calls.append(kwargs) or 0)
    monkeypatch.delenv("NEKOYA_PASSWORD", raising=False)
    return calls


def test_the_password_comes_from_the_environment(launched_with, monkeypatch, capsys):
    monkeypatch.setenv("NEKOYA_PASSWORD", "from-env")
    assert launch.main(["--username", "me", "--allowed-hosts", "proxy.example, [fd00::5]:443"]) == 0
    assert launched_with[0]["auth"] == ("me", "from-env")
    assert launched_with[0]["allowed_hosts"] == ["proxy.example", "fd00::5"]
    assert "process list" not in capsys.readouterr().err


def test_a_password_on_the_command_line_warns_that_ps_shows_it(launched_with, capsys):
    assert launch.main(["--username", "me", "--password", "visible"]) == 0
    assert launched_with[0]["auth"] == ("me", "visible")
    assert "--password shows in the process list" in capsys.readouterr().err


def test_an_unreadable_password_file_is_named(launched_with, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert launch.main(["--username", "me", "--password-file", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err and launched_with == []
    (tmp_path / "empty.txt").write_text("\n")
    assert launch.main(["--username", "me", "--password-file", str(tmp_path / "empty.txt")]) == 2
    assert "first line is empty" in capsys.readouterr().err


# ---- last: what the servers did on the network during all of the above ---------------------------


@pytest.mark.slow
def test_the_gui_makes_no_network_access(local_gui, lan_gui):
    assert network_attempts(local_gui.socket_log) == ""
    assert network_attempts(lan_gui.socket_log) == ""
