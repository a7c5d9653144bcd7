"""setup.sh's install stamp, run in a copy of the repository whose .venv is a fake: its python logs
what it is asked to do (pip installs nothing) so the test sees what gui.sh and test.sh would install."""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha1sum") is None,
                                reason="setup.sh needs bash and sha1sum")

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "{log}"
[[ "$1 $2" == "-m pip" ]] && exit 0
exec "{real}" "$@"
"""


@pytest.fixture
def repo(tmp_path):
    """A copy of setup.sh and pyproject.toml with a fake .venv; returns (folder, log file)."""
    for name in ("setup.sh", "pyproject.toml"):
        shutil.copy2(REPO / name, tmp_path / name)
    log = tmp_path / "python.log"
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON.format(log=log, real=sys.executable))
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return tmp_path, log


def stamp(folder: Path, extras: str) -> Path:
    digest = hashlib.sha1((folder / "pyproject.toml").read_bytes()).hexdigest()[:12]
    return folder / ".venv" / f".nekoya-{extras}-{digest}"


def setup(folder: Path, log: Path, *args: str) -> list[str]:
    """Run setup.sh; the python calls it made (pip calls only)."""
    log.write_text("")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(folder / "setup.sh"), *args], check=True, env=env, capture_output=True, timeout=120)
    return [line for line in log.read_text().splitlines() if line.startswith("-m pip")]


def stamps(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / ".venv").glob(".nekoya-*"))


def test_gui_after_test_installs_nothing(repo):
    folder, log = repo
    stamp(folder, "optimizers,test").touch()
    assert setup(folder, log) == []
    assert stamps(folder) == [stamp(folder, "optimizers,test").name]


def test_test_after_gui_adds_only_the_test_tools_then_both_are_installed(repo):
    folder, log = repo
    stamp(folder, "optimizers").touch()
    calls = setup(folder, log, "--test")
    assert len(calls) == 1, calls
    installed = calls[0].split()
    assert "-e" not in installed and "pytest>=8" in installed and "playwright>=1.40" in installed
    assert stamps(folder) == [stamp(folder, "optimizers,test").name]
    assert setup(folder, log) == [] and setup(folder, log, "--test") == []


def test_a_changed_pyproject_installs_the_package_again(repo):
    folder, log = repo
    (folder / ".venv" / ".nekoya-optimizers,test-000000000000").touch()
    calls = setup(folder, log)
    assert calls[-1].endswith("install -q -e .[optimizers]"), calls
    assert stamps(folder) == [stamp(folder, "optimizers").name]
