"""A run of two processes from the GUI, in a real browser: Start launches the torchrun group, the live view
shows each process's memory, the step plan the whole batch, and Stop saves one file and ends both processes."""
from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from test_gui_browser import (ARTIFACTS, CHROMIUM, VIEWPORT, browser, expect, fill_small_run, free_port, gui,  # noqa: F401
                              live, needs_trainer, open_app, show_tab, type_into, wait_for_status, wait_for_step)

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium at /usr/bin/chromium")]


def _group_processes() -> list[psutil.Process]:
    """torchrun and its workers, started by the app in this process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "trainer" in child.cmdline() or "torch.distributed.run" in child.cmdline():
                found.append(child)
        except psutil.Error:
            continue
    return found


@needs_trainer
def test_stop_during_a_two_process_run_saves_one_file_and_ends_both(browser, gui, tiny_sd1_dir, image_folder,  # noqa: F811
                                                                    tmp_path):
    page = browser.new_page(viewport=VIEWPORT)
    open_app(page, gui[0])
    out = tmp_path / "out"
    fill_small_run(page, tiny_sd1_dir, image_folder, out, tmp_path / "small.json", steps=5000, name="gui_group")
    type_into(page, "num_processes", 2)
    type_into(page, "num_cpu_threads_per_process", 1)
    type_into(page, "main_process_port", free_port())
    expect(page.locator("#nk-plan")).to_contain_text("(1 per process × 2 processes)")
    page.click("#start_training")
    wait_for_status(page, "running")
    wait_for_step(page, 3)
    memory = page.locator("#nk-memory-cell")
    expect(memory).to_contain_text("of 2 processes")
    expect(memory).to_contain_text("rank 1:")
    ranks = sorted(int(p.environ().get("RANK", -1)) for p in _group_processes() if "RANK" in p.environ())
    assert ranks == [0, 1]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "gui_two_processes.png"))
    page.click("#stop_training")
    wait_for_status(page, "stopped")
    expect(page.locator("#run_message")).to_contain_text("Stopped at step")
    saved = page.locator("#nk-saved-files code")
    expect(saved).to_have_count(1)
    assert Path(saved.first.get_attribute("title")).is_file()
    assert [p.name for p in out.glob("*.safetensors")] == [Path(saved.first.get_attribute("title")).name]
    assert not [p for p in _group_processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    page.close()
