"""The run column on a laptop screen and on a desktop one, in a real browser (Chromium through Playwright).

One real (tiny, CPU) run per window size: the step plan is in view before Start; a double click on Start
starts one run with no error; during the run the progress bar, loss chart and memory cell stay in the
window, also with the column scrolled down to the samples; Stop ends it and the message says so.
Writes ``test-artifacts/gui_layout_<size>_plan.png`` and ``..._running.png`` for people to look at.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
pytest.importorskip("gradio")
pytest.importorskip("playwright.sync_api")

from test_gui_browser import (ARTIFACTS, CHROMIUM, browser, expect, fill_small_run, free_port,  # noqa: E402,F401
                              needs_trainer, no_handler_errors, open_app, wait_for_status, wait_for_step)

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium at /usr/bin/chromium"),
              needs_trainer]

SIZES = {"1366x768": {"width": 1366, "height": 768}, "1920x1080": {"width": 1920, "height": 1080}}
LIVE_STATUS = ("#nk-live .nk-progress", "#nk-loss-chart", "#nk-memory-cell")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app served in-process; yields (url, its RunManager)."""
    from app.run_manager import RunManager
    from app.ui import build_app, launch_options

    runs = RunManager()
    demo = build_app(run_manager=runs, user_presets_dir=tmp_path_factory.mktemp("user_presets"))
    demo.queue(default_concurrency_limit=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                **launch_options())
    yield f"http://127.0.0.1:{port}/", runs
    if runs.busy:
        runs.stop()
        runs.wait(60)
    demo.close()


def assert_in_window(page, selector: str) -> None:
    box = page.locator(selector).bounding_box()
    size = page.viewport_size
    assert box is not None, f"{selector} is not laid out"
    inside = box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= size["width"] and box["y"] + box["height"] <= size["height"]
    assert inside, f"{selector} at {box} lies outside the {size['width']}x{size['height']} window"


def scroll_column_to(page, selector: str) -> None:
    """Scroll as a user does: the page until the run column sticks at the window's top, then the column
    until ``selector``'s bottom edge comes into view."""
    page.locator("#nk-run-column").evaluate("""(column, selector) => {
        window.scrollBy(0, column.getBoundingClientRect().top - 8);
        document.querySelector(selector).scrollIntoView({block: 'end'});
    }""", selector)


def assert_uncovered(page, selector: str) -> None:
    """The middle of ``selector`` is what the window shows there (nothing lies over it)."""
    hit = page.locator(selector).evaluate("""target => {
        const r = target.getBoundingClientRect();
        return target.contains(document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2));
    }""")
    assert hit, f"{selector} is covered"


def assert_drawn_at_own_size_in_view(img, gallery) -> None:
    """A 64 px sample in a wider cell: drawn at 64 px (scale-down), its middle inside the gallery's visible box."""
    img.page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())  # decoded
    natural, width, fit = img.evaluate("img => [img.naturalWidth, img.width, getComputedStyle(img).objectFit]")
    assert natural == 64 and width > 64 and fit == "scale-down", (natural, width, fit)
    cell, frame = img.bounding_box(), gallery.bounding_box()
    middle = (cell["x"] + cell["width"] / 2, cell["y"] + cell["height"] / 2)
    assert frame["x"] < middle[0] < frame["x"] + frame["width"] and frame["y"] < middle[1] < frame["y"] + frame["height"]


def shot(page, size: str, what: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"gui_layout_{size}_{what}.png"))


def log_rows(page) -> dict:
    """Where the log box's rows lie against its visible top (0: a row starts right there)."""
    return page.evaluate("""() => {
        const box = document.querySelector('#nk-log');
        const top = box.getBoundingClientRect().top + parseFloat(getComputedStyle(box).paddingTop);
        const rows = [...box.children].map(r => r.getBoundingClientRect());
        return {scrollTop: box.scrollTop, offsets: rows.map(r => r.top - top), heights: rows.map(r => r.height)};
    }""")


@pytest.fixture
def idle_app(app):
    """The shared app with no run going, before and after the test (a failed test must not leave its run to the next)."""
    _stop_any_run(app[1])
    yield app
    _stop_any_run(app[1])


def _stop_any_run(runs) -> None:
    if runs.busy:
        runs.stop()
        assert runs.wait(120)


@pytest.mark.parametrize("size", SIZES)
def test_the_run_column_keeps_the_plan_and_then_the_live_run_in_the_window(size, idle_app, browser, tiny_sd1_dir, image_folder, tmp_path):
    url, runs = idle_app
    page = browser.new_page(viewport=SIZES[size])
    page.set_default_timeout(20_000)
    open_app(page, url)
    fill_small_run(page, tiny_sd1_dir, image_folder, tmp_path / "out", tmp_path / "small.json", steps=5000, name=f"layout_{size}")
    page.evaluate("window.scrollTo(0, 0)")  # typing scrolled the form; the window opens at its top

    assert_in_window(page, "#nk-plan")  # before Start: the whole step plan, with its content
    expect(page.locator("#nk-plan-formula")).to_contain_text("max_train_steps = 5000 steps")
    expect(page.locator("#nk-plan")).to_contain_text("Ready to train")
    shot(page, size, "plan")

    runs_before = runs.snapshot().run_id
    page.dblclick("#start_training")
    expect(page.locator("#run_message")).to_contain_text("Training started")
    expect(page.locator("#start_training")).to_be_disabled()
    wait_for_step(page, 3)
    expect(page.locator("#run_message")).to_have_text("Training started.")  # the second click said nothing
    assert runs.snapshot().run_id == runs_before + 1
    for selector in LIVE_STATUS:
        assert_in_window(page, selector)

    page.click("#sample_now")
    gallery = page.locator("#samples_gallery")
    expect(gallery.locator("img").first).to_be_visible(timeout=120_000)
    assert_drawn_at_own_size_in_view(gallery.locator("img").first, gallery)
    scroll_column_to(page, "#samples_gallery")
    assert_in_window(page, "#samples_gallery")
    assert_uncovered(page, "#samples_gallery")
    for selector in LIVE_STATUS:  # scrolled down to the samples, the run's status is still in view
        assert_in_window(page, selector)
    shot(page, size, "running")

    page.click("#stop_training")
    wait_for_status(page, "stopped")
    expect(page.locator("#run_message")).to_contain_text("Stopped at step")
    expect(page.locator("#start_training")).to_be_enabled()
    assert runs.snapshot().run_id == runs_before + 1  # one run for the double click
    rows = log_rows(page)
    assert rows["scrollTop"] == 0  # column-reverse: 0 is scrolled to the newest line
    assert len(set(rows["heights"])) == 1  # one text row per log line: none wraps
    assert any(abs(offset) < 0.5 for offset in rows["offsets"])  # the box's top is a line's start
    page.close()
