"""The report: grouping and wording of the CLI text, adjustments, and a failing check never breaking check()."""
from __future__ import annotations

import pytest

from test_preflight_support import big_cpu, settings
from trainer.preflight import CHECKS, Problem, PreflightReport, check
from trainer.preflight import device as device_module


@pytest.fixture(autouse=True)
def fixed_device(monkeypatch):
    monkeypatch.setattr(device_module, "probe_device", big_cpu)


def test_problem_line_names_the_key_and_the_label():
    problem = Problem("error", "train_data_dir", "x is missing", fix="choose it", file="/data/x")
    line = problem.format(severity_column=True)
    assert line.splitlines()[0] == "error    train_data_dir (Image folder): x is missing"
    assert "file: /data/x" in line and "fix: choose it" in line
    assert Problem("note", None, "general thing").format(severity_column=True) == "note     general: general thing"
    # a run log gives the severity as its level: the text itself does not start with it again
    assert problem.format().splitlines() == ["train_data_dir (Image folder): x is missing", "  file: /data/x", "  fix: choose it"]
    with pytest.raises(ValueError):
        Problem("fatal", None, "x")


def test_format_groups_errors_warnings_notes_then_plan_and_memory(tmp_path, tiny_sd1_file):
    s = settings(tmp_path, tiny_sd1_file, network_alpha=64, network_dim=8, lr_scheduler="constant", lr_warmup=5,
                 output_name="x", learning_rate=0, unet_lr=0, text_encoder_lr=0)
    text = check(s).format()
    order = [text.index(h) for h in ("Errors:", "Warnings:", "Notes:", "Step plan:", "Memory estimate:")]
    assert order == sorted(order), text
    assert text.startswith("Preflight: 1 error, 1 warning, 2 notes; training cannot start")
    assert "error    learning_rate (Learning rate): every learning rate is 0" in text
    assert "adjusted for this run: lr_warmup = 0" in text
    assert "10_sks dog: 3 images × 10 repeats" in text


def test_ok_and_adjusted_leave_the_settings_alone_without_changes(tmp_path, tiny_sd1_file):
    s = settings(tmp_path, tiny_sd1_file)
    report = check(s)
    assert report.ok and report.changes() == {} and report.adjusted(s) is s
    assert PreflightReport().ok and not PreflightReport([Problem("error", None, "x")]).ok


def test_later_changes_win_and_for_field_filters():
    report = PreflightReport([Problem("note", "a", "1", changes=(("lr_warmup", 5),)),
                              Problem("note", "lr_warmup", "2", changes=(("lr_warmup", 0),))])
    assert report.changes() == {"lr_warmup": 0} and [p.message for p in report.for_field("lr_warmup")] == ["2"]


def test_a_crashing_check_becomes_an_error_naming_it(tmp_path, tiny_sd1_file, monkeypatch):
    def broken(ctx):
        raise ZeroDivisionError("oops")

    monkeypatch.setitem(CHECKS, "test.broken", broken)
    report = check(settings(tmp_path, tiny_sd1_file))
    [error] = report.errors
    assert "'test.broken' failed unexpectedly: ZeroDivisionError: oops" in error.message
    assert report.plan is not None  # the other checks still ran


def test_check_never_raises_on_nonsense_values(tmp_path, tiny_sd1_file):
    s = settings(tmp_path, tiny_sd1_file).model_copy(update={
        "train_batch_size": "many", "max_resolution": "big", "network_dim": None, "optimizer": None,
        "train_data_dir": 42, "output_name": "",
    })
    report = check(s)
    assert not report.ok and report.format()


def test_only_the_named_checks_run(tmp_path, tiny_sd1_file):
    report = check(settings(tmp_path, tiny_sd1_file, output_dir=""), checks=["dataset.train_folder"])
    assert report.ok  # output.folder did not run


def test_every_check_has_a_dotted_concern_name():
    concerns = {name.split(".")[0] for name in CHECKS}
    assert concerns == {"dataset", "model", "network", "optimizer", "training", "output", "memory"}
