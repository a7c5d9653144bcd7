"""GUI form logic as plain Python: widgets built from the settings model, values round-tripped
through the real Gradio components, presets, config files, model pick and the step plan."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
gr = pytest.importorskip("gradio")

from app import model_pick  # noqa: E402
from app.checks import check_form  # noqa: E402
from app.form import form_values, settings_from_form, valid_part_of_form  # noqa: E402
from app.plan_panel import plan_html  # noqa: E402
from app.presets import USER_PREFIX, PresetFolders, load_over_form, save_form  # noqa: E402
from app.widgets import EMPTY_CHOICE_LABEL, build_settings_tabs, elem_id  # noqa: E402
from trainer.settings import TABS, SettingsError, TrainingSettings, setting_infos  # noqa: E402

WIDGET_CLASSES = {
    "checkbox": gr.Checkbox, "dropdown": gr.Dropdown, "radio": gr.Radio, "number": gr.Number, "slider": gr.Slider,
    "text": gr.Textbox, "textarea": gr.Textbox, "path": gr.Textbox, "file": gr.Textbox, "folder": gr.Textbox,
}


@pytest.fixture(scope="module")
def components():
    with gr.Blocks():
        return build_settings_tabs()


@pytest.fixture
def defaults():
    return form_values(TrainingSettings())


def other_value(info):
    """A valid value different from the default, for every kind of setting."""
    special = {"max_resolution": "640,448", "output_name": "my_lora", "optimizer_args": "relative_step=False",
               "lr_scheduler_args": "T_max=100", "max_bucket_reso": 2048 + 64, "max_timestep": 900}
    if info.key in special:
        return special[info.key]
    if info.type is bool:
        return not info.default
    if info.choices:
        return next(c for c in reversed(info.choices) if c != info.default)
    if info.type is int:
        return int(info.ge if info.ge is not None and info.ge != info.default else info.default + 1)
    if info.type is float:
        high = info.le if info.le is not None else info.default + 1
        low = info.ge if info.ge is not None else 0
        return round(low + (high - low) * 0.37, 2)
    return f"some {info.key} text"


def through_widget(component, value):
    """What the handler gets back after the page showed ``value`` (postprocess, then preprocess)."""
    return component.preprocess(component.postprocess(value))


def test_every_setting_has_exactly_one_widget_in_its_tab(components):
    infos = setting_infos()
    assert list(components) == [i.key for i in infos]
    for info in infos:
        component = components[info.key]
        assert isinstance(component, WIDGET_CLASSES[info.widget]), info.key
        assert component.label.startswith(info.label)
        assert component.elem_id == elem_id(info.key)
    assert {i.tab for i in infos} == set(TABS)


def test_widgets_show_the_declared_defaults_choices_and_ranges(components):
    for info in setting_infos():
        component = components[info.key]
        assert component.value == info.default, info.key
        if info.choices:
            assert [value for _, value in component.choices] == list(info.choices), info.key
        if info.widget == "slider":
            assert (component.minimum, component.maximum) == (info.ge, info.le), info.key
    assert components["caption_extension"].choices[0] == (EMPTY_CHOICE_LABEL, "")


# Settings that cannot both differ from their defaults at once: round-tripped in a second pass.
SECOND_PASS = {"full_bf16"}


@pytest.mark.parametrize("keys", ["first", "second"])
def test_every_setting_round_trips_through_its_widget(components, keys):
    infos = [i for i in setting_infos() if (i.key in SECOND_PASS) == (keys == "second")]
    expected = TrainingSettings(**{info.key: other_value(info) for info in infos})  # the test's values must be valid
    shown = form_values(expected)
    back = {key: through_widget(components[key], value) for key, value in shown.items()}
    settings = settings_from_form(back)
    for info in infos:
        assert getattr(settings, info.key) == getattr(expected, info.key), info.key
        assert getattr(settings, info.key) != info.default, f"{info.key}: test value equals the default"
    assert settings == expected


def test_invalid_form_values_name_their_field(defaults):
    result = check_form({**defaults, "network_dim": 0, "max_resolution": "big"})
    assert not result.ok and result.settings is None
    fields = {p.field for p in result.errors}
    assert {"network_dim", "max_resolution"} <= fields
    page = plan_html({**defaults, "network_dim": 0})
    assert "Parameters › Network Rank (Dimension)" in page and "nk-error" in page


def test_valid_part_of_form_keeps_good_values_and_names_bad_ones(defaults):
    settings, dropped = valid_part_of_form({**defaults, "network_dim": 32, "epoch": "many"})
    assert settings.network_dim == 32 and settings.epoch == 1
    assert dropped == ["epoch"]


# ---- presets and config files ---------------------------------------------------------


@pytest.fixture
def folders(tmp_path):
    shipped = tmp_path / "presets"
    shipped.mkdir()
    (shipped / "Small net.json").write_text(json.dumps({"network_dim": 4, "network_alpha": 2, "optimizer": "AdamW"}))
    (shipped / "notes.txt").write_text("not a preset")
    return PresetFolders(shipped=shipped, user=tmp_path / "presets" / "user")


def test_listing_shows_shipped_then_user_presets_and_refreshes(folders):
    assert list(folders.listing()) == ["Small net"]
    folders.user.mkdir()
    (folders.user / "mine.json").write_text("{}")
    assert list(folders.listing()) == ["Small net", USER_PREFIX + "mine"]


def test_shipped_presets_load_and_layer_over_the_form(defaults):
    shipped = PresetFolders().listing()
    assert "SD15 - 8GB card" in shipped and "Quick test" in shipped
    form = {**defaults, "train_data_dir": "/data/img", "network_dim": 64}
    outcome = load_over_form(shipped["SD15 - 8GB card"], form)
    assert outcome.ok, outcome.problems
    assert outcome.values["network_dim"] == 32 and outcome.values["train_batch_size"] == 2
    assert outcome.values["train_data_dir"] == "/data/img"  # not in the preset: the form's value stays
    assert "Network Rank (Dimension) 64 → 32" in outcome.messages[0]


def test_kohya_config_with_legacy_and_unknown_keys_loads_as_is(tmp_path, defaults):
    config = {"use_8bit_adam": "True", "lora_network_weights": "/w.safetensors", "epoch": "3", "clip_skip": "2",
              "LoRA_type": "LoCon", "save_model_as": "diffusers", "some_new_kohya_key": 5, "wandb_api_key": ""}
    path = tmp_path / "kohya.json"
    path.write_text(json.dumps(config))
    outcome = load_over_form(path, defaults)
    assert outcome.ok, outcome.problems
    v = outcome.values
    assert (v["optimizer"], v["network_weights"], v["epoch"], v["clip_skip"]) == ("AdamW8bit", "/w.safetensors", 3, 2)
    assert (v["LoRA_type"], v["save_model_as"]) == ("LyCORIS/LoCon", "safetensors")
    assert any("some_new_kohya_key" in w for w in outcome.warnings)
    assert outcome.kept["some_new_kohya_key"] == 5  # written back on save


def test_bad_config_files_report_plain_problems(tmp_path, defaults):
    missing = load_over_form(tmp_path / "nope.json", defaults)
    assert not missing.ok and "does not exist" in missing.problems[0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"network_dim": "lots"}))
    outcome = load_over_form(bad, defaults)
    assert not outcome.ok and outcome.problems[0].startswith("network_dim (Network Rank (Dimension), Parameters tab)")


def test_save_then_load_back_round_trips_the_form(folders, defaults):
    form = {**defaults, "network_dim": 24, "learning_rate": 0.0003, "output_name": "cat", "sample_prompts": "a cat\n--n dog"}
    target = folders.save_target("my preset")
    assert target == folders.user / "my preset.json"
    save_form(target, form, kept={"some_new_kohya_key": 5})
    saved = json.loads(target.read_text())
    assert saved["network_dim"] == 24 and saved["some_new_kohya_key"] == 5
    assert USER_PREFIX + "my preset" in folders.listing()
    outcome = load_over_form(folders.path_of(USER_PREFIX + "my preset"), defaults)
    assert {k: outcome.values[k] for k in ("network_dim", "learning_rate", "output_name", "sample_prompts")} == {
        "network_dim": 24, "learning_rate": 0.0003, "output_name": "cat", "sample_prompts": "a cat\n--n dog"}


def test_save_targets_and_refusals(folders, tmp_path, defaults):
    assert folders.save_target(str(tmp_path / "cfg" / "run1")) == tmp_path / "cfg" / "run1.json"
    assert folders.save_target("user/x.json") == folders.user / "x.json"
    for bad in ("", "  ", "a|b"):
        with pytest.raises(ValueError):
            folders.save_target(bad)
    with pytest.raises(SettingsError) as err:
        save_form(folders.save_target("broken"), {**defaults, "network_dim": 0})
    assert "network_dim" in err.value.lines[0]
    assert not (folders.user / "broken.json").exists()


# ---- model pick ---------------------------------------------------------------------------


def test_quick_pick_sets_path_and_family_flags():
    values, note = model_pick.on_quick_pick("stabilityai/stable-diffusion-2-1")
    assert values == {"pretrained_model_name_or_path": "stabilityai/stable-diffusion-2-1", "v2": True,
                      "v_parameterization": True, "sdxl": False}
    assert "v-prediction" in note
    values, _ = model_pick.on_quick_pick("stabilityai/stable-diffusion-xl-base-1.0")
    assert values["sdxl"] and not values["v2"]
    assert model_pick.on_quick_pick("custom")[0] == {}


def test_typed_model_path_moves_the_quick_pick(tmp_path):
    assert model_pick.on_model_path("runwayml/stable-diffusion-v1-5")[0]["model_list"] == "runwayml/stable-diffusion-v1-5"
    values, note = model_pick.on_model_path(str(tmp_path / "missing.safetensors"))
    assert values == {"model_list": "custom"} and "Not found" in note


def test_detected_family_sets_flags_for_a_custom_path(tiny_sdxl_dir, tiny_sd2v_dir):
    values, note = model_pick.on_model_path(str(tiny_sdxl_dir))
    assert values == {"model_list": "custom", "v2": False, "v_parameterization": False, "sdxl": True,
                      "flux1_checkbox": False, "sd3_checkbox": False}
    assert "SDXL" in note
    values, note = model_pick.on_model_path(str(tiny_sd2v_dir))
    assert values == {"model_list": "custom", "v2": True, "v_parameterization": True, "sdxl": False,
                      "flux1_checkbox": False, "sd3_checkbox": False}


def test_a_lora_file_typed_as_the_model_is_explained(tmp_path):
    numpy = pytest.importorskip("numpy")
    from safetensors.numpy import save_file

    lora = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": numpy.zeros((4, 8), dtype=numpy.float32)}, str(lora))
    values, note = model_pick.on_model_path(str(lora))
    assert values == {"model_list": "custom"} and "LoRA file" in note


def test_detector_results_become_flags():
    class Info:
        family, v_parameterization = "sd2", None

    off = {"flux1_checkbox": False, "sd3_checkbox": False}  # an SD model unticks Flux.1 and SD3
    assert model_pick._flags_of(Info()) == {"v2": True, "sdxl": False, **off}  # SD2 file that does not say: v-pred kept
    Info.v_parameterization = True
    assert model_pick._flags_of(Info()) == {"v2": True, "v_parameterization": True, "sdxl": False, **off}
    assert model_pick._flags_of("sdxl") == {"v2": False, "v_parameterization": False, "sdxl": True, **off}
    assert model_pick._flags_of(None) == {} and model_pick._flags_of(object()) == {}


# ---- step plan --------------------------------------------------------------------------


def test_plan_shows_formula_with_numbers_for_an_image_folder(image_folder, defaults, tmp_path):
    form = {**defaults, "train_data_dir": str(image_folder), "output_dir": str(tmp_path / "out"), "epoch": 2,
            "max_resolution": "64,64", "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 32}
    result = check_form(form)
    assert result.plan is not None and result.plan.total_steps == (4 * 10 + 3 * 5) * 2
    page = plan_html(form)
    assert "4 images × 10 repeats" in page and f"{result.plan.total_steps} steps" in page
    assert "10_sks dog" in page  # per-folder line
