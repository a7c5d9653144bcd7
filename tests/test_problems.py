"""One Problem type from settings validation, the preflight check and a failed run to the GUI, and one
base class for every user-facing error in trainer/."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import trainer
from app.checks import check_form
from app.form import form_values
from app.live_panel import render_live
from app.plan_panel import render_check, render_problems
from app.run_manager import RunManager
from trainer.devtools.synthetic import make_image_folder
from trainer.loop import train
from trainer.problems import NekoyaError, Problem, is_user_error, problem_of
from trainer.settings import SettingsError, TrainingSettings, settings_from_dict

# Exception classes in trainer/ that are not user-facing errors, each with the reason.
NOT_USER_FACING: dict[str, str] = {}


def _exception_classes_defined_in_trainer() -> dict[str, type]:
    found = {}
    for module_info in pkgutil.walk_packages(trainer.__path__, "trainer."):
        if module_info.name.endswith("__main__"):  # the CLI entry point runs on import
            continue
        module = importlib.import_module(module_info.name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_error_class_in_trainer_derives_from_the_one_base():
    classes = _exception_classes_defined_in_trainer()
    assert len(classes) >= 17  # the walk found the modules (CheckpointError, SaveError, ToolError, ...)
    outside = sorted(name for name, cls in classes.items() if not issubclass(cls, NekoyaError))
    assert outside == sorted(NOT_USER_FACING), f"derive these from trainer.problems.NekoyaError: {outside}"


def test_error_classes_keep_their_other_bases():
    from trainer.safety import SaveError
    from trainer.settings.config_file import ConfigFileError

    save = SaveError("disk full", path="/x", previous_intact=True, free_bytes=0, cause_errno=28)
    assert isinstance(save, OSError) and save.errno == 28 and save.disk_full and str(save) == "disk full"
    assert issubclass(SettingsError, ValueError) and issubclass(ConfigFileError, ValueError)


def test_a_user_error_becomes_its_problem_and_a_bug_keeps_its_type_name():
    class Missing(NekoyaError):
        field, fix, file = "train_data_dir", "choose the folder", "/data/img"

    assert problem_of(Missing("no images")) == Problem("error", "train_data_dir", "no images", "choose the folder",
                                                       "/data/img")
    assert is_user_error(Missing()) and is_user_error(FileNotFoundError("gone"))
    assert not is_user_error(ZeroDivisionError("oops"))
    assert problem_of(ZeroDivisionError("oops")).message == "ZeroDivisionError: oops"


def test_settings_errors_carry_the_field_and_keep_their_text():
    with pytest.raises(SettingsError) as err:
        settings_from_dict({"network_dim": 0})
    (problem,) = err.value.problems
    assert problem.field == "network_dim" and problem.severity == "error"
    assert problem.message.startswith("0 is not allowed") and "network_dim" not in problem.message
    assert err.value.lines == [f"network_dim (Network Rank (Dimension), Parameters tab): {problem.message}"]


def test_the_gui_names_the_setting_from_the_field_not_from_the_message():
    page = render_problems([Problem("error", "network_dim", "a message that names no setting")])
    assert "Parameters › Network Rank (Dimension)" in page and "a message that names no setting" in page


def _form(**changes) -> dict:
    return {**form_values(TrainingSettings()), **changes}


def test_a_settings_error_reaches_the_plan_panel_as_a_field():
    result = check_form(_form(network_dim=0))
    (problem,) = result.errors
    assert problem.field == "network_dim"
    page = render_check(result)
    assert "Parameters › Network Rank (Dimension)</span> 0 is not allowed" in page


def test_a_preflight_problem_reaches_the_plan_panel_as_a_field(tmp_path):
    result = check_form(_form(train_data_dir=str(tmp_path / "missing")))
    problem = next(p for p in result.errors if p.field == "train_data_dir")
    assert str(tmp_path / "missing") in problem.message
    assert "Folders › Image folder" in render_check(result)


def test_a_failed_run_reaches_the_live_panel_with_its_field(tiny_sd1_dir, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    images = make_image_folder(tmp_path / "img", {"1_sks dog": 2}, sizes=[(64, 64)], seed=3)
    settings = TrainingSettings(pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(images),
                                output_dir=str(tmp_path / "out"), output_name="tiny", max_resolution="64,64",
                                network_weights=str(damaged))
    runs = RunManager(train)
    assert runs.start(settings)[0]
    assert runs.wait(120)
    snap = runs.snapshot()
    assert snap.status == "error" and snap.error.field == "network_weights"
    assert "Fix: Parameters › Network weights" in render_live(snap)
