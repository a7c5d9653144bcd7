"""The pages around training in a real browser (Chromium through Playwright), in one page session:
prepare a dataset and copy its folders to the Folders tab, edit a caption, inspect a LoRA file,
then generate with it in Try it (tiny SD1 model, 64 px, 2 steps).

Writes ``test-artifacts/tab_dataset_preparation.png``, ``tab_tools.png`` and ``tab_try_it.png``.
"""
from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
pytest.importorskip("gradio")
pytest.importorskip("playwright.sync_api")

from test_gui_browser import (ARTIFACTS, CHROMIUM, VIEWPORT, box, browser, expect, free_port,  # noqa: E402,F401
                              no_handler_errors, show_tab, type_into)
from test_tools_support import random_lora  # noqa: E402

from trainer.devtools.synthetic import make_image_folder  # noqa: E402

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium at /usr/bin/chromium")]


@pytest.fixture(scope="module")
def app_url():
    from app.run_manager import RunManager
    from app.ui import build_app, launch_options

    demo = build_app(run_manager=RunManager())
    demo.queue(default_concurrency_limit=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                **launch_options())
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def text_box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input[type=text], #{elem_id} input[type=number]").first


def fill(page, elem_id: str, value) -> None:
    target = text_box(page, elem_id)
    target.fill(str(value))
    target.press("Tab")  # numbers commit on blur


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"tab_{name}.png"), full_page=True)


def prepare_and_copy_to_folders(page, images, dest) -> None:
    show_tab(page, "Dataset Preparation")
    fill(page, "prep_instance", "sks")
    fill(page, "prep_class", "dog")
    fill(page, "prep_images", images)
    fill(page, "prep_destination", dest)
    page.click("#prep_run")
    expect(page.locator("#prep_status")).to_contain_text("Prepared")
    expect(page.locator("#prep_report")).to_contain_text("40_sks dog")
    expect(text_box(page, "cap_folder")).to_have_value(str(dest / "img"))  # the caption editor follows
    page.click("#prep_copy")
    expect(page.locator("#prep_status")).to_contain_text("Folders tab filled")
    show_tab(page, "Training")
    show_tab(page, "Folders")
    for key, folder in (("train_data_dir", "img"), ("output_dir", "model"), ("logging_dir", "log")):
        expect(box(page, key)).to_have_value(str(dest / folder))
    expect(box(page, "reg_data_dir")).to_have_value("")  # no regularisation folder was prepared


def edit_a_caption(page, dest) -> None:
    show_tab(page, "Dataset Preparation")
    page.click("#cap_load")
    expect(page.locator("#cap_status")).to_contain_text("3 image(s) in 1 folder(s)")
    page.locator("#cap_table [data-testid=cell-1-3]").click()  # row 2, caption column
    caption = text_box(page, "cap_caption")
    expect(caption).to_have_value("sks dog")  # no caption file: the folder name
    expect(page.locator("#cap_source")).to_contain_text("training uses the folder name")
    expect(page.locator("#cap_image img")).to_be_visible()
    caption.fill("sks dog, sitting")
    page.click("#cap_save")
    expect(page.locator("#cap_save_status")).to_contain_text("Saved 001.txt")
    assert (dest / "img" / "40_sks dog" / "001.txt").read_text(encoding="utf-8") == "sks dog, sitting"
    expect(page.locator("#cap_tag_table")).to_contain_text("sitting")
    shot(page, "dataset_preparation")


def inspect_the_lora(page, lora, model) -> None:
    show_tab(page, "Tools")
    expect(text_box(page, "inspect_base")).to_have_value(str(model))  # from the Source Model tab
    expect(page.locator("#inspect_file input")).to_have_value(str(lora))  # newest LoRA in the output folder
    page.click("#inspect_run")
    expect(page.locator("#inspect_status")).to_contain_text("Every key matches the base model")
    expect(page.locator("#inspect_modules")).to_contain_text("lora_unet_")
    expect(page.locator("#inspect_settings")).to_contain_text("network dim")
    shot(page, "tools")
    show_tab(page, "Resize")
    expect(text_box(page, "resize_file")).to_have_value(str(lora))


def generate_in_try_it(page, lora, model) -> None:
    show_tab(page, "Try it")
    expect(text_box(page, "tryit_base_model")).to_have_value(str(model))
    expect(page.locator("#tryit_lora input")).to_have_value(str(lora))
    for elem_id, value in (("tryit_prompt", "photo of sks dog"), ("tryit_width", 64), ("tryit_height", 64),
                           ("tryit_steps", 2), ("tryit_seed", 5)):
        fill(page, elem_id, value)
    page.click("#tryit_generate")
    expect(page.locator("#tryit_note")).to_contain_text("1 image(s)", timeout=60_000)
    expect(page.locator("#tryit_note")).to_contain_text("seed 5")
    expect(page.locator("#tryit_gallery img")).to_have_count(1)
    page.get_by_label("the base model alone").check()
    page.click("#tryit_compare")
    expect(page.locator("#tryit_note")).to_contain_text("vs base model", timeout=60_000)
    expect(page.locator("#tryit_gallery img")).to_have_count(2)
    shot(page, "try_it")


def test_prepare_caption_inspect_and_try_in_one_page(browser, app_url, tiny_sd1_dir, tmp_path):
    images = make_image_folder(tmp_path / "sources", {"photos": 3}, captions=False, seed=4) / "photos"
    dest = tmp_path / "dataset"
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(20_000)
    page.goto(app_url)
    expect(page.locator("#start_training")).to_be_visible()
    show_tab(page, "Source Model")
    type_into(page, "pretrained_model_name_or_path", tiny_sd1_dir)

    prepare_and_copy_to_folders(page, images, dest)
    edit_a_caption(page, dest)
    lora = dest / "model" / "sks.safetensors"  # as if a run had saved it in the output folder
    shutil.copy(random_lora(tmp_path, tiny_sd1_dir, "browser", metadata={"ss_network_dim": "4"}), lora)
    inspect_the_lora(page, lora, tiny_sd1_dir)
    generate_in_try_it(page, lora, tiny_sd1_dir)
    page.close()
