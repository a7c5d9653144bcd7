"""No command touches the network: a real tiny training run through ``python -m trainer`` under a
socket guard (tests/no_network/sitecustomize.py) that logs and blocks every lookup or connection
to another machine. The run starts from an environment without any offline variable, as a
user's shell would be, and uses bitsandbytes on the CPU, which asks the Hub for a kernel on import.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_cmd import images, write_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow  # runs training in a subprocess

GUARD_DIR = Path(__file__).resolve().parent / "no_network"
REPO = Path(__file__).resolve().parent.parent
ONLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "GRADIO_ANALYTICS_ENABLED",
                   "DO_NOT_TRACK", "HF_DATASETS_OFFLINE")


def guarded_environment(socket_log: Path) -> dict[str, str]:
    """The user's environment with no offline switch set, and the socket guard installed."""
    env = {key: value for key, value in os.environ.items() if key not in ONLINE_SWITCHES}
    env["PYTHONPATH"] = os.pathsep.join([str(GUARD_DIR), str(REPO)])
    env["NEKOYA_SOCKET_LOG"] = str(socket_log)
    env["OMP_NUM_THREADS"] = "1"
    return env


def network_attempts(socket_log: Path) -> str:
    return socket_log.read_text(encoding="utf-8") if socket_log.exists() else ""


@pytest.mark.parametrize("optimizer", ["AdamW8bit", "Adafactor"])  # bitsandbytes itself; transformers imports it
def test_cli_training_makes_no_network_access(optimizer, tiny_sd1_dir, images, tmp_path):  # noqa: F811
    pytest.importorskip("bitsandbytes")
    config = write_config(tmp_path / "config.json", tiny_sd1_dir, images, tmp_path / "out", optimizer=optimizer)
    socket_log = tmp_path / "sockets.log"
    done = subprocess.run([sys.executable, "-m", "trainer", "train", "--config", str(config)], cwd=REPO,
                          env=guarded_environment(socket_log), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "cli.safetensors").is_file()
    assert network_attempts(socket_log) == ""
    # the known-harmless bitsandbytes/kernels lines are not shown to the user
    assert "gemm_4bit_forward" not in done.stderr and "publisher trust" not in done.stderr
