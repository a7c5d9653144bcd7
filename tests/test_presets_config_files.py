"""Config files that are not configs: /dev/zero, a FIFO, non-UTF-8 text, 100000-deep nesting, a huge file,
a folder. The GUI's Load config / presets and the CLI (`python -m trainer config`, `check --config`) all
answer with one line naming the file and the fix, promptly, without a traceback or a hang."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
pytest.importorskip("gradio")

from app.form import form_values  # noqa: E402
from app.presets import PresetFolders, load_over_form, load_preset  # noqa: E402
from trainer.settings import TrainingSettings  # noqa: E402
from trainer.settings.config_file import MAX_CONFIG_BYTES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MEMORY_HEADROOM = 1024**3  # a reader that slurps /dev/zero hits this and fails instead of filling the machine
HANG_SECONDS = 20

# kind -> (what the message says, how to make the file in a folder)
BAD_FILES = {
    "dev_zero": ("is a device, not a file", lambda folder: _link(folder / "zero.json", "/dev/zero")),
    "fifo": ("is a named pipe (FIFO), not a file", lambda folder: _fifo(folder / "pipe.json")),
    "folder": ("is a folder, not a file", lambda folder: _mkdir(folder / "dir.json")),
    "non_utf8": ("is not UTF-8 text (byte 20", lambda folder: _write(folder / "latin1.json", '{"output_name": "caf\xe9"}'.encode("latin-1"))),
    "deep": ("nested more than 32 levels deep", lambda folder: _write(folder / "deep.json", b"[" * 100_000 + b"]" * 100_000)),
    "too_large": ("is larger than 1024 KiB", lambda folder: _write(folder / "huge.json", b'{"x": "' + b"a" * MAX_CONFIG_BYTES + b'"}')),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _link(path: Path, target: str) -> Path:
    path.symlink_to(target)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _release_fifo(path: Path) -> None:
    """Give a reader stuck on the FIFO its end of file, so a failing (old) reader does not block pytest."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@contextlib.contextmanager
def memory_cap():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (in_use + MEMORY_HEADROOM, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def promptly(fn):
    """``fn()``'s result, or a test failure if it is still running after HANG_SECONDS (or raised)."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            result["error"] = err

    with memory_cap():
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(HANG_SECONDS)
    assert not worker.is_alive(), f"still reading after {HANG_SECONDS} s"
    assert "error" not in result, f"raised {result.get('error')!r} instead of a message"
    return result["value"]


@pytest.fixture
def defaults():
    return form_values(TrainingSettings())


@pytest.fixture(params=sorted(BAD_FILES))
def bad_file(request, tmp_path):
    expected, make = BAD_FILES[request.param]
    path = make(tmp_path)
    yield path, expected
    if path.is_fifo():
        _release_fifo(path)


def test_load_config_refuses_a_bad_file_with_a_message(bad_file, defaults):
    path, expected = bad_file
    outcome = promptly(lambda: load_over_form(str(path), defaults))
    assert not outcome.ok and outcome.values == {}
    assert len(outcome.problems) == 1
    assert repr(str(path)) in outcome.problems[0] and expected in outcome.problems[0], outcome.problems


def test_presets_folder_with_bad_files_lists_and_loads_each_with_a_message(tmp_path, defaults):
    folders = PresetFolders(shipped=tmp_path / "presets", user=tmp_path / "presets" / "user")
    folders.shipped.mkdir()
    made = {kind: make(folders.shipped) for kind, (_, make) in BAD_FILES.items()}
    (folders.shipped / "good.json").write_text(json.dumps({"network_dim": 8}))
    try:
        listing = promptly(folders.listing)
        # regular files are listed (and refused when picked); pipes, devices and folders are not files
        assert sorted(listing) == sorted(["good", "deep", "huge", "latin1"])
        for label in ("deep", "huge", "latin1"):
            outcome = promptly(lambda: load_preset(folders, label, defaults))
            assert not outcome.ok and repr(str(folders.shipped / f"{label}.json")) in outcome.problems[0]
        assert promptly(lambda: load_preset(folders, "good", defaults)).values["network_dim"] == 8
    finally:
        _release_fifo(made["fifo"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60 + HANG_SECONDS, preexec_fn=cap_memory)


@pytest.mark.parametrize("command", [["config"], ["check", "--config"]])
def test_cli_refuses_a_bad_config_file_with_a_message(bad_file, command):
    path, expected = bad_file
    out = run_cli(*command, str(path))
    assert out.returncode == (2 if command == ["config"] else 1), out.stderr
    assert repr(str(path)) in out.stderr and expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_a_kohya_config_with_a_byte_order_mark_loads(tmp_path, defaults):
    path = _write(tmp_path / "bom.json", "\ufeff".encode() + json.dumps({"network_dim": 12}).encode())
    assert load_over_form(path, defaults).values["network_dim"] == 12
