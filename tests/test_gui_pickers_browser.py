"""A path field's 📂 picker in a real browser (Chromium through Playwright, as test_gui_browser.py): browse
the server's allowed folders and fill the field with the chosen one."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
pytest.importorskip("gradio")
pytest.importorskip("playwright.sync_api")

from test_gui_browser import box, browser, expect, gui, no_handler_errors, page, pick, show_tab  # noqa: E402,F401  (fixtures)

from app.path_picker import ROOTS_ENV  # noqa: E402

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")]


@pytest.fixture
def root(tmp_path, monkeypatch):
    (tmp_path / "data" / "10_sks dog").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    monkeypatch.setenv(ROOTS_ENV, str(tmp_path))  # read by the app's handlers at each call
    return tmp_path.resolve()


def test_the_folder_picker_fills_the_image_folder(page, root):
    show_tab(page, "Folders")
    page.click("#setting_train_data_dir_browse")
    expect(page.locator("#setting_train_data_dir_picker")).to_be_visible()
    pick(page, "setting_train_data_dir_entries", f"📁 {root}")  # the one allowed root
    expect(page.locator("#setting_train_data_dir_folder input")).to_have_value(str(root))
    pick(page, "setting_train_data_dir_entries", "📁 data/")
    expect(page.locator("#setting_train_data_dir_folder input")).to_have_value(str(root / "data"))
    expect(page.locator("#setting_train_data_dir_entries input")).to_have_value("")
    page.click("#setting_train_data_dir_up")
    expect(page.locator("#setting_train_data_dir_folder input")).to_have_value(str(root))
    pick(page, "setting_train_data_dir_entries", "📁 data/")
    page.click("#setting_train_data_dir_choose")
    expect(box(page, "train_data_dir")).to_have_value(str(root / "data"))
    expect(page.locator("#setting_train_data_dir_picker")).to_be_hidden()
