"""The run plan is made once, by the preflight check, and the run follows it: one step plan, one network
spec, each rule's note once in the run log, and the metadata records the precision that ran."""
from __future__ import annotations

import ast
import io
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from test_train import images, tiny_settings  # noqa: F401 (fixture)
from trainer.commands import train_cmd
from trainer.data import plan as plan_module
from trainer.network_spec import NetworkSpec
from trainer.preflight import check

LOOP = Path(__file__).resolve().parents[1] / "trainer" / "loop.py"


def test_the_loop_fits_300_lines_and_imports_only_at_the_top():
    source = LOOP.read_text()
    assert len(source.splitlines()) <= 300
    tree = ast.parse(source)
    local = [node.lineno for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert local == [], f"function-local imports at lines {local}"


def test_a_full_check_returns_the_plan_a_quick_one_does_not(tiny_sd1_dir, images, tmp_path):
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path, optimizer="Adafactor", lr_scheduler="cosine")
    plan = check(settings, deep=True).run_plan
    assert plan.settings.lr_scheduler == "adafactor"  # the check's adjustment, which the run follows
    assert plan.optimizer.scheduler_override == "adafactor" and plan.scheduler.name == "adafactor"
    assert plan.steps.total_steps == 2 and plan.network == NetworkSpec.from_settings(settings)
    assert check(settings, deep=False).run_plan is None
    bad = tiny_settings(tiny_sd1_dir, images, tmp_path, LoRA_type="Kohya LoHa")
    report = check(bad, deep=True)
    assert not report.ok and report.run_plan is None


@pytest.fixture(scope="module")
def cli_run(tiny_sd1_dir, images, tmp_path_factory):
    """One CLI training run with Adafactor (its own schedule) and fp16 asked for on a CPU, counting how
    often the step plan and the network spec are made."""
    counts = {"plan_steps": 0, "network_spec": 0}
    real_plan, real_spec = plan_module.plan_steps, NetworkSpec.from_settings.__func__

    def counted_plan(*args, **kwargs):
        counts["plan_steps"] += 1
        return real_plan(*args, **kwargs)

    def counted_spec(cls, settings):
        counts["network_spec"] += 1
        return real_spec(cls, settings)

    patch = pytest.MonkeyPatch()
    patch.setattr(plan_module, "plan_steps", counted_plan)
    patch.setattr(NetworkSpec, "from_settings", classmethod(counted_spec))
    out, err = io.StringIO(), io.StringIO()
    try:
        settings = tiny_settings(tiny_sd1_dir, images, tmp_path_factory.mktemp("cli_run"), optimizer="Adafactor",
                                 lr_scheduler="cosine", lr_warmup=10, mixed_precision="fp16")
        code = train_cmd.run(settings, out, err)
    finally:
        patch.undo()
    return settings, code, out.getvalue() + err.getvalue(), counts


@pytest.mark.slow  # trains a tiny model
def test_one_run_makes_one_step_plan_and_one_network_spec(cli_run):
    _, code, log, counts = cli_run
    assert code == train_cmd.EXIT_OK, log
    assert counts == {"plan_steps": 1, "network_spec": 1}


@pytest.mark.slow  # trains a tiny model
def test_each_rule_says_its_note_once_in_the_run_log(cli_run):
    settings, _, log, _ = cli_run
    adafactor = [line for line in log.splitlines() if "relative_step=True" in line]
    # the check's notes (schedule, per-part rates, warmup), each once; the trainer does not say them again
    said = [p.format().splitlines()[0] for p in check(settings).notes if "relative_step=True" in p.message]
    assert len(said) == 3 and sorted(adafactor) == sorted(said), adafactor
    assert log.count("mixed precision fp16 needs a GPU") == 1  # the precision rule
    assert "training in fp32 on cpu" in log


@pytest.mark.slow  # trains a tiny model
def test_metadata_records_the_precision_that_ran(cli_run):
    settings, _, _, _ = cli_run
    with safe_open(str(Path(settings.output_dir) / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
    assert settings.mixed_precision == "fp16" and meta["ss_mixed_precision"] == "no"
    assert meta["ss_lr_scheduler"] == "adafactor"


@pytest.mark.slow  # trains a tiny model
def test_a_run_given_the_checks_plan_follows_it_without_checking_again(tiny_sd1_dir, images, tmp_path, monkeypatch):
    import trainer.loop

    settings = tiny_settings(tiny_sd1_dir, images, tmp_path, optimizer="Adafactor", lr_scheduler="cosine")
    plan = check(settings, deep=True).run_plan

    def no_second_check(*args):
        raise AssertionError("the run checked again")

    monkeypatch.setattr(trainer.loop, "plan_run", no_second_check)
    result = trainer.loop.train(settings, plan=plan)
    assert result.status == "finished" and result.step == plan.steps.total_steps


def test_a_warning_of_the_dataset_checks_does_not_stop_the_plan(tiny_sd1_dir, images, tmp_path):
    root = tmp_path / "img"
    shutil.copytree(images, root)
    shutil.copy(next(Path(images).glob("*/*.png")), root / "loose.png")  # beside the concept folder: not used
    report = check(tiny_settings(tiny_sd1_dir, root, tmp_path / "out"), deep=True)
    assert any("lie directly" in p.message for p in report.warnings) and report.ok
    assert report.run_plan is not None and report.run_plan.steps.total_steps == 2
