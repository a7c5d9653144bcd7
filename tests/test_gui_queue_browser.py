"""The job queue in a real browser, with the app as ``launch.py`` starts it: three jobs added from the form, two of
them reordered, the app killed while the second runs and started again; the queue finishes all three, the killed
job going on from its last state folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_gui_browser import (CHROMIUM, CHROMIUM_ARGS, TRAINING_TIMEOUT_MS, VIEWPORT, expect, free_port, needs_trainer,
                              open_app, playwright_api, show_tab, type_into, wait_for_status)

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 120
QUEUE_CONFIG = {  # loaded as a kohya_ss config file, like a user's
    "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 32, "mixed_precision": "no",
    "optimizer": "AdamW", "lr_scheduler": "constant", "lr_warmup": 0, "learning_rate": 0.001, "unet_lr": 0.001,
    "text_encoder_lr": 0.0005, "network_dim": 4, "network_alpha": 4, "save_every_n_epochs": 0, "save_precision": "float",
    "xformers": "none", "cache_latents": True, "seed": 1234, "save_state": True, "max_resolution": "64,64",
}

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium at /usr/bin/chromium")]


class App:
    """``python launch.py --headless`` on a free port, with its own queue folder; killed as a crash would."""

    def __init__(self, log: Path, queue_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "NEKOYA_QUEUE_DIR": str(queue_dir), "GRADIO_ANALYTICS_ENABLED": "False"}
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "launch.py", "--headless", "--server_port", str(self.port)],
                                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"launch.py exited:\n{self.log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(self.url, timeout=5)
                return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"launch.py did not answer:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def queue_jobs(queue_dir: Path) -> list[dict]:
    try:
        return json.loads((queue_dir / "queue.json").read_text())["jobs"]
    except (FileNotFoundError, ValueError):
        return []


def second_running(queue_dir: Path) -> bool:
    jobs = queue_jobs(queue_dir)
    return len(jobs) == 3 and jobs[1]["state"] == "running"


def fill_job(page, name: str, out: Path, steps: int, save_every_n_steps: int = 0) -> None:
    show_tab(page, "Folders")
    type_into(page, "output_dir", out)
    type_into(page, "output_name", name)
    show_tab(page, "Parameters")
    type_into(page, "max_train_steps", steps)
    show_tab(page, "Advanced")
    type_into(page, "save_every_n_steps", save_every_n_steps)
    expect(page.locator("#nk-plan")).to_contain_text(f"max_train_steps = {steps} steps")


def add_job(page, name: str) -> None:
    page.click("#add_to_queue")
    expect(page.locator("#queue_message")).to_contain_text(f"Added {name} to the queue")


def pick_job(page, label: str) -> None:
    page.locator("#queue_pick input").click()
    page.get_by_role("option", name=label, exact=True).click()


def rows(page):
    return page.locator("#queue_table tr[data-job]")


@needs_trainer
def test_three_jobs_reordered_survive_an_app_restart_and_all_finish(browser, tiny_sd1_dir, image_folder, tmp_path):
    queue_dir, out = tmp_path / "queue", tmp_path / "out"
    config = tmp_path / "queue_run.json"
    config.write_text(json.dumps({**QUEUE_CONFIG, "pretrained_model_name_or_path": str(tiny_sd1_dir),
                                  "train_data_dir": str(image_folder), "output_dir": str(out), "output_name": "first"}))
    app = App(tmp_path / "launch.log", queue_dir)
    try:
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(20_000)
        open_app(page, app.url)
        page.locator("#config_path input, #config_path textarea").first.fill(str(config))
        page.click("#config_load")
        expect(page.locator("#preset_status")).to_contain_text("Loaded")
        expect(page.locator("#nk-plan")).to_contain_text("Ready to train", timeout=60_000)

        fill_job(page, "first", out, steps=30)
        add_job(page, "first")  # nothing runs: it starts at once; paused while the others are added
        wait_for_status(page, "running")
        page.click("#pause_training")
        wait_for_status(page, "paused")
        fill_job(page, "third", out, steps=3)
        add_job(page, "third")
        fill_job(page, "second", out, steps=8, save_every_n_steps=1)
        add_job(page, "second")
        expect(rows(page)).to_have_count(3)
        pick_job(page, "3. second")
        page.click("#queue_up")  # second before third
        expect(rows(page).nth(1)).to_contain_text("second")
        expect(rows(page).nth(2)).to_contain_text("third")
        page.click("#resume_training")

        deadline = time.monotonic() + TRAINING_TIMEOUT_MS / 1000
        while not (second_running(queue_dir) and any(out.glob("second*-state/manifest.json"))):
            assert time.monotonic() < deadline, f"the second job did not save a state:\n{queue_jobs(queue_dir)}"
            time.sleep(0.05)
        app.kill()  # the app dies while the second job runs
        states = [j["state"] for j in queue_jobs(queue_dir)]
        assert states == ["done", "running", "waiting"], states
        page.close()

        app = App(tmp_path / "launch.log", queue_dir)  # started again: the queue goes on by itself
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(20_000)
        open_app(page, app.url)
        for i, name in enumerate(("first", "second", "third")):
            expect(rows(page).nth(i)).to_contain_text(name)
            expect(rows(page).nth(i)).to_have_attribute("data-state", "done", timeout=TRAINING_TIMEOUT_MS)
        jobs = queue_jobs(queue_dir)
        assert [(j["name"], j["state"], j["step"]) for j in jobs] == [("first", "done", 30), ("second", "done", 8),
                                                                     ("third", "done", 3)]
        for name in ("first", "second", "third"):
            assert (out / f"{name}.safetensors").is_file()
        assert "second: goes on from" in (tmp_path / "launch.log").read_text()
        page.close()
    finally:
        app.kill()
