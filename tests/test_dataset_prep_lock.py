"""Two dataset preparations into one destination (the Dataset Preparation tab's handler): the second is refused
and never deletes the first one's staging; a lock left by a dead process does not block."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
pytest.importorskip("gradio")

from app import dataset_actions as actions  # noqa: E402
from trainer.dataset_prep.dest_lock import LOCK_NAME, destination_lock  # noqa: E402
from trainer.dataset_prep.staging import STAGING_PREFIX  # noqa: E402
from trainer.devtools.synthetic import make_image_folder  # noqa: E402


@pytest.fixture
def values(tmp_path):
    make_image_folder(tmp_path / "src", {"photos": 3}, captions="some", seed=1)
    return dict(instance_prompt="sks", class_prompt="dog", images_dir=str(tmp_path / "src" / "photos"), repeats=40,
                reg_images_dir="", reg_repeats=1, destination=str(tmp_path / "dataset"), merge=False)


def test_preparation_while_another_process_prepares_there_is_refused_and_its_staging_kept(values, tmp_path):
    dest = tmp_path / "dataset"
    staging = dest / "img" / f"{STAGING_PREFIX}40_sks dog-x1"  # the other preparation's copy in progress
    staging.mkdir(parents=True)
    (staging / "a.png").write_bytes(b"being copied")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (dest / LOCK_NAME).write_text(str(other.pid))
        status, report, settings = actions.prepare(values, ".txt")
        assert "nk-error" in status and f"another dataset preparation (process {other.pid}) is copying into" in status
        assert settings == {} and (staging / "a.png").read_bytes() == b"being copied"
        assert not (dest / "img" / "40_sks dog").exists()
    finally:
        other.kill()
        other.wait()
    status, _, settings = actions.prepare(values, ".txt")  # its process is gone: the lock is stale
    assert "Prepared" in status and settings["train_data_dir"] == str(dest.absolute() / "img")
    assert not (dest / LOCK_NAME).exists() and not staging.exists()  # a dead run's staging is cleared


def test_second_preparation_from_the_same_gui_process_is_refused(values, tmp_path):
    dest = tmp_path / "dataset"
    with destination_lock(dest):  # a first click still copying in another worker thread
        status, _, settings = actions.prepare(values, ".txt")
    assert "nk-error" in status and f"(process {os.getpid()})" in status and settings == {}
    assert not (dest / "img").exists()
    assert "Prepared" in actions.prepare(values, ".txt")[0]
