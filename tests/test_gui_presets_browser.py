"""The Configuration panel in a real browser (Chromium through Playwright, as test_gui_browser.py): picking a
preset loads it and "Load again" says so; Save asks before replacing a preset and refuses names outside
the presets folder."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
pytest.importorskip("gradio")
pytest.importorskip("playwright.sync_api")

from test_gui_browser import box, browser, expect, gui, no_handler_errors, page, pick, show_tab, type_into  # noqa: E402,F401  (fixtures)

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")]


def status(page):
    return page.locator("#preset_status")


def save_as(page, name: str) -> None:
    page.locator("#preset_save_name input, #preset_save_name textarea").first.fill(name)
    page.click("#preset_save")


def test_picking_a_preset_loads_it_and_load_again_says_so(page):
    show_tab(page, "Parameters")
    pick(page, "preset_choice", "SD15 - 8GB card")  # no button pressed
    expect(status(page)).to_contain_text("Loaded 'SD15 - 8GB card': ")
    expect(status(page)).to_contain_text("Network Rank (Dimension)")
    expect(box(page, "network_dim")).to_have_value("32")
    page.click("#preset_load")
    expect(status(page)).to_contain_text("Loaded 'SD15 - 8GB card' again: the form still has all its values")
    type_into(page, "network_dim", 48)
    page.click("#preset_load")
    expect(status(page)).to_contain_text("Loaded 'SD15 - 8GB card' again: 1 setting(s) changed: Network Rank (Dimension) 48 → 32.")
    expect(box(page, "network_dim")).to_have_value("32")


def test_save_asks_before_replacing_a_preset(page, gui):
    target = gui[1] / "confirm me.json"
    show_tab(page, "Parameters")
    type_into(page, "network_dim", 8)
    save_as(page, "confirm me")
    expect(status(page)).to_contain_text(f"Saved {target}")
    type_into(page, "network_dim", 16)
    page.click("#preset_save")
    expect(status(page)).to_contain_text(f"{target} exists; press Save again to replace it.")
    assert json.loads(target.read_text())["network_dim"] == 8
    page.click("#preset_save")
    expect(status(page)).to_contain_text(f"Replaced {target}")
    assert json.loads(target.read_text())["network_dim"] == 16


def test_save_refuses_a_name_outside_the_presets_folder(page, gui):
    save_as(page, "../escaped")
    expect(status(page)).to_contain_text("Save as: '../escaped' is neither a plain name nor a full path")
    assert not (gui[1].parent / "escaped.json").exists()
