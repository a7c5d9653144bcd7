"""The GUI in a real browser (Debian's Chromium through Playwright), trainer included.

One app in this process for the whole module; each test opens a fresh page, as a
user reopening the browser would. The training tests type a tiny model and an
image folder into the form and run the real in-process trainer on the CPU.
Writes ``test-artifacts/gui_running.png`` (the page mid-run) for people to look at.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect
expect.set_options(timeout=15_000)  # the machine may be busy: assertions wait, they do not race

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
VIEWPORT = {"width": 1440, "height": 1000}
TRAINING_TIMEOUT_MS = 120_000

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium at /usr/bin/chromium")]
needs_trainer = pytest.mark.skipif(importlib.util.find_spec("trainer.loop") is None, reason="trainer.loop is not in this tree")

# What the tiny CPU runs use besides the typed paths: loaded as a kohya_ss config file, like a user's.
SMALL_RUN_CONFIG = {
    "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 32, "mixed_precision": "no",
    "optimizer": "AdamW", "lr_scheduler": "constant", "lr_warmup": 0, "learning_rate": 0.001, "unet_lr": 0.001,
    "text_encoder_lr": 0.0005, "network_dim": 4, "network_alpha": 4, "save_every_n_epochs": 0, "save_precision": "float",
    "xformers": "none", "cache_latents": True, "seed": 1234, "sample_prompts": "sks dog --w 64 --h 64 --s 2 --d 5",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gui(tmp_path_factory):
    """The app served in-process; yields (url, user presets folder)."""
    from app.run_manager import RunManager
    from app.ui import build_app, launch_options

    user_presets = tmp_path_factory.mktemp("user_presets")
    runs = RunManager()
    demo = build_app(run_manager=runs, user_presets_dir=user_presets)
    demo.queue(default_concurrency_limit=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False, **launch_options())
    yield f"http://127.0.0.1:{port}/", user_presets
    if runs.busy:
        runs.stop()
        runs.wait(60)
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(autouse=True)
def no_handler_errors(capfd):
    """A handler that raises only prints a traceback on the server: fail the test that caused it."""
    yield
    assert "Traceback" not in capfd.readouterr().err


@pytest.fixture
def page(browser, gui):
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(20_000)
    open_app(page, gui[0])
    yield page
    page.close()


def open_app(page, url: str) -> None:
    page.goto(url)
    expect(page.locator("#start_training")).to_be_visible()
    expect(page.locator("#nk-live")).to_be_visible()


# ---- widget helpers: what a user clicks and types -------------------------------------------


def box(page, key: str):
    """The text or number box of a setting (sliders: their number box)."""
    return page.locator(f"#setting_{key} textarea, #setting_{key} input[type=text], #setting_{key} input[type=number]").first


def type_into(page, key: str, value) -> None:
    target = box(page, key)
    target.fill(str(value))
    target.press("Tab")  # numbers and sliders commit on blur


def pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def show_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()
    # Gradio mounts a tab's widgets the first time it is shown: let two frames pass so their input handlers are
    # live before anything is typed (a value typed within the same frame once did not reach the app on a busy host)
    page.wait_for_function("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => done(true))))")


def live(page):
    return page.locator("#nk-live")


def wait_for_step(page, step: int) -> None:
    try:
        page.wait_for_function(f"Number(document.querySelector('#nk-live')?.dataset.step) >= {step}", timeout=TRAINING_TIMEOUT_MS)
    except playwright_api.Error as err:
        raise AssertionError(f"the run did not reach step {step}:\n{run_report(page)}") from err


def wait_for_status(page, status: str) -> None:
    try:
        expect(live(page)).to_have_attribute("data-status", status, timeout=TRAINING_TIMEOUT_MS)
    except AssertionError as err:
        raise AssertionError(f"the run did not become {status!r}:\n{run_report(page)}") from err


def run_report(page) -> str:
    """What the page says about the run, for failure messages."""
    return page.locator("#nk-live").inner_text(timeout=5_000)


# ---- tests ----------------------------------------------------------------------------------


def test_every_tab_shows_its_settings(page):
    from trainer.settings import TABS, setting_infos

    first_of_tab = {}
    for info in setting_infos():
        first_of_tab.setdefault(info.tab, info)
    for tab in TABS:
        show_tab(page, tab)
        info = first_of_tab[tab]
        widget = page.locator(f"#setting_{info.key}")
        expect(widget).to_be_visible()
        expect(widget).to_contain_text(info.label)


def test_a_shipped_preset_fills_the_widgets(page):
    show_tab(page, "Folders")
    type_into(page, "train_data_dir", "/data/my images")
    pick(page, "preset_choice", "SD15 - 8GB card")
    page.click("#preset_load")
    expect(page.locator("#preset_status")).to_contain_text("Loaded 'SD15 - 8GB card'")
    show_tab(page, "Parameters")
    expect(box(page, "network_dim")).to_have_value("32")
    expect(box(page, "train_batch_size")).to_have_value("2")
    expect(page.locator("#setting_optimizer input")).to_have_value("AdamW8bit")
    show_tab(page, "Advanced")
    expect(page.locator("#setting_shuffle_caption input[type=checkbox]")).to_be_checked()
    show_tab(page, "Folders")
    expect(box(page, "train_data_dir")).to_have_value("/data/my images")  # not in the preset: kept


def test_a_preset_saved_from_the_page_loads_back(page, gui):
    user_presets = gui[1]
    show_tab(page, "Parameters")
    type_into(page, "network_dim", 24)
    type_into(page, "optimizer_args", "weight_decay=0.05")
    page.locator("#preset_save_name input, #preset_save_name textarea").first.fill("browser roundtrip")
    page.click("#preset_save")
    expect(page.locator("#preset_status")).to_contain_text("Saved")
    saved = json.loads((user_presets / "browser roundtrip.json").read_text())
    assert saved["network_dim"] == 24 and saved["optimizer_args"] == "weight_decay=0.05"

    type_into(page, "network_dim", 8)
    type_into(page, "optimizer_args", "")
    pick(page, "preset_choice", "user/browser roundtrip")  # the list refreshed after saving
    page.click("#preset_load")
    expect(box(page, "network_dim")).to_have_value("24")
    expect(box(page, "optimizer_args")).to_have_value("weight_decay=0.05")


def test_lycoris_options_show_for_the_types_that_use_them(page):
    """kohya_ss's LyCORIS accordion: each option only for the types whose network_args carry it."""
    show_tab(page, "Parameters")
    lycoris_section = page.locator(".settings-section").filter(has_text="LyCORIS Preset")
    expect(page.locator("#setting_LyCORIS_preset")).to_be_hidden()
    expect(lycoris_section).to_be_hidden()  # no empty accordion for the types without LyCORIS options
    pick(page, "setting_LoRA_type", "LyCORIS/LoKr")
    expect(lycoris_section).to_be_visible()
    for key in ("LyCORIS_preset", "factor", "use_cp", "decompose_both", "dora_wd", "network_dim", "conv_dim"):
        expect(page.locator(f"#setting_{key}")).to_be_visible()
    expect(page.locator("#setting_train_on_input")).to_be_hidden()
    pick(page, "setting_LoRA_type", "LyCORIS/iA3")
    expect(page.locator("#setting_train_on_input")).to_be_visible()
    expect(page.locator("#setting_factor")).to_be_hidden()
    expect(page.locator("#setting_network_dim")).to_be_hidden()  # iA3 has no rank
    pick(page, "setting_LoRA_type", "Standard")
    expect(page.locator("#setting_LyCORIS_preset")).to_be_hidden()
    expect(lycoris_section).to_be_hidden()
    expect(page.locator("#setting_network_dim")).to_be_visible()


def test_fields_show_only_where_they_apply(page):
    """Conv rank only for LoCon types, Multires fields only for the Multires noise type (visible_when)."""
    show_tab(page, "Parameters")
    expect(page.locator("#setting_conv_dim")).to_be_hidden()
    pick(page, "setting_LoRA_type", "Kohya LoCon")
    expect(page.locator("#setting_conv_dim")).to_be_visible()
    show_tab(page, "Advanced")
    expect(page.locator("#setting_multires_noise_iterations")).to_be_hidden()
    expect(page.locator("#setting_noise_offset")).to_be_visible()
    pick(page, "setting_noise_offset_type", "Multires")
    expect(page.locator("#setting_multires_noise_iterations")).to_be_visible()
    expect(page.locator("#setting_noise_offset")).to_be_hidden()
    pick(page, "setting_noise_offset_type", "Original")  # leave the shared page as it was
    show_tab(page, "Parameters")
    pick(page, "setting_LoRA_type", "Standard")


def test_invalid_values_are_named_in_the_page_and_block_start(page):
    show_tab(page, "Parameters")
    type_into(page, "max_resolution", "huge")
    plan = page.locator("#nk-plan")
    expect(plan).to_contain_text("Parameters › Max resolution")
    expect(plan).to_contain_text("width,height")
    page.click("#start_training")
    expect(page.locator("#run_message")).to_contain_text("Not started")
    expect(page.locator("#run_message")).to_contain_text("Max resolution")
    expect(live(page)).not_to_have_attribute("data-status", "starting")


def fill_small_run(page, model: Path, images: Path, out: Path, config: Path, steps: int, name: str) -> None:
    config.write_text(json.dumps(SMALL_RUN_CONFIG))
    page.locator("#config_path input, #config_path textarea").first.fill(str(config))
    page.click("#config_load")
    expect(page.locator("#preset_status")).to_contain_text("Loaded")
    show_tab(page, "Source Model")
    type_into(page, "pretrained_model_name_or_path", model)
    expect(page.locator("#model_note")).to_contain_text("SD 1.x")
    show_tab(page, "Folders")
    type_into(page, "train_data_dir", images)
    type_into(page, "output_dir", out)
    type_into(page, "output_name", name)
    show_tab(page, "Parameters")
    type_into(page, "max_resolution", "64,64")
    type_into(page, "max_train_steps", steps)
    expect(page.locator("#nk-plan")).to_contain_text(f"max_train_steps = {steps} steps")
    expect(page.locator("#nk-plan")).to_contain_text("Ready to train", timeout=60_000)


@needs_trainer
def test_training_runs_to_the_end_with_chart_and_file(page, tiny_sd1_dir, image_folder, tmp_path):
    out = tmp_path / "out"
    fill_small_run(page, tiny_sd1_dir, image_folder, out, tmp_path / "small.json", steps=8, name="gui_full")
    show_tab(page, "Samples")
    type_into(page, "sample_every_n_steps", 4)
    page.click("#start_training")
    # an 8-step run can be over before the page looks again: "Training started" and the disabled Start button
    # are checked during the long run of test_a_run_survives_reloads_refuses_a_second_start_and_stops_cleanly
    wait_for_status(page, "finished")
    expect(page.locator("#nk-progress-text")).to_contain_text("100% · step 8 / 8")
    expect(page.locator("#run_message")).to_have_text("Finished at step 8 / 8. Saved gui_full.safetensors.")
    expect(page.locator("#start_training")).to_be_enabled()
    points = page.locator("#nk-loss-chart polyline.nk-line-avg").get_attribute("points").split()
    assert len(points) >= 8
    files = page.locator("#nk-saved-files code")
    expect(files.first).to_contain_text("gui_full")
    assert Path(files.first.get_attribute("title")).is_file()
    expect(page.locator("#samples_gallery img")).to_have_count(2)  # sampled at steps 4 and 8
    assert len(list((out / "sample").glob("gui_full_*.png"))) == 2


@needs_trainer
def test_a_run_survives_reloads_refuses_a_second_start_and_stops_cleanly(browser, gui, tiny_sd1_dir, image_folder, tmp_path):
    url = gui[0]
    page = browser.new_page(viewport=VIEWPORT)
    open_app(page, url)
    fill_small_run(page, tiny_sd1_dir, image_folder, tmp_path / "out", tmp_path / "small.json", steps=5000, name="gui_stop")
    page.click("#start_training")
    expect(page.locator("#run_message")).to_contain_text("Training started")
    expect(page.locator("#start_training")).to_be_disabled()  # no second run by a second click
    wait_for_status(page, "running")
    wait_for_step(page, 3)
    page.close()  # closing the browser does not stop the run

    page = browser.new_page(viewport=VIEWPORT)
    open_app(page, url)
    expect(live(page)).to_have_attribute("data-status", "running")
    show_tab(page, "Folders")
    expect(box(page, "output_name")).to_have_value("gui_stop")  # the reopened page shows the run's settings
    wait_for_step(page, int(live(page).get_attribute("data-step")) + 1)  # still going
    wait_for_step(page, 10)  # a few more points, so the picture shows a curve
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "gui_running.png"))

    expect(page.locator("#start_training")).to_be_disabled()  # the reopened page cannot start a second run
    page.click("#sample_now")
    expect(page.locator("#samples_gallery img").first).to_be_visible(timeout=TRAINING_TIMEOUT_MS)
    page.click("#save_now")  # saves mid-run, training goes on
    expect(page.locator("#nk-saved-files li").first).to_contain_text("gui_stop", timeout=TRAINING_TIMEOUT_MS)
    expect(live(page)).to_have_attribute("data-status", "running")
    page.click("#stop_training")
    wait_for_status(page, "stopped")
    expect(page.locator("#run_message")).to_contain_text("Stopped at step")
    stopped_at = int(live(page).get_attribute("data-step"))
    assert 10 <= stopped_at < 5000
    saved = page.locator("#nk-saved-files code")
    expect(saved).to_have_count(2)  # the one saved on request, then the one saved on stop
    for i in range(2):
        assert Path(saved.nth(i).get_attribute("title")).is_file()
    page.close()


@needs_trainer
def test_pause_resume_and_train_more(page, tiny_sd1_dir, image_folder, tmp_path):
    fill_small_run(page, tiny_sd1_dir, image_folder, tmp_path / "out", tmp_path / "small.json", steps=5000, name="gui_pause")
    page.click("#start_training")
    wait_for_step(page, 2)
    page.click("#pause_training")
    wait_for_status(page, "paused")
    expect(page.locator("#nk-paused")).to_contain_text("Paused at step")
    expect(page.locator("#pause_training")).to_be_disabled()
    paused_at = int(live(page).get_attribute("data-step"))
    page.wait_for_timeout(1500)
    assert int(live(page).get_attribute("data-step")) == paused_at  # no step while paused
    page.click("#resume_training")
    wait_for_step(page, paused_at + 2)
    page.click("#stop_training")
    wait_for_status(page, "stopped")
    stopped_at = int(live(page).get_attribute("data-step"))
    expect(page.locator("#nk-train-more")).to_be_visible()
    page.locator("#train_more_amount input").fill("2")
    page.get_by_label("steps", exact=True).check()
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#nk-run-column").screenshot(path=str(ARTIFACTS / "gui_train_more.png"))
    page.click("#train_more")
    expect(page.locator("#run_message")).to_contain_text("fresh optimizer")  # the stopped run saved no state
    wait_for_status(page, "finished")
    expect(page.locator("#nk-progress-text")).to_contain_text(f"step {stopped_at + 2} / {stopped_at + 2}")
