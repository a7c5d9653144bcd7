"""The Tools tab's handlers as plain Python: inspect / verify, resize, merge into a checkpoint and
extract back, on the tiny SD1 model, with refusals shown as status lines (never exceptions)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
pytest.importorskip("gradio")

from test_tools_support import one_thread, random_lora  # noqa: E402,F401  (fixture)

from app import tools_actions as tools  # noqa: E402


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_sd1_dir):
    folder = tmp_path_factory.mktemp("gui_tools")
    return random_lora(folder, tiny_sd1_dir, "gui_tools", rank=4, conv_rank=2,
                       metadata={"ss_network_dim": "4", "ss_network_alpha": "2", "ss_learning_rate": "0.0001"})


def rows(table: dict) -> list[list]:
    return [row for row in table["data"] if any(cell not in ("", None) for cell in row)]


def test_inspect_lists_modules_and_settings_and_verifies_against_the_base(lora, tiny_sd1_dir):
    from trainer.tools import inspect_lora

    status, report, settings, modules = tools.inspect(str(lora), str(tiny_sd1_dir))
    expected = inspect_lora(lora)
    assert "Every key matches the base model" in status
    assert len(rows(modules)) == len(expected.modules)
    assert {row[3] for row in rows(modules)} == {m.rank for m in expected.modules}
    assert ["learning rate", "0.0001"] in rows(settings) and ["network dim", "4"] in rows(settings)
    assert "OK:" in report and "Training settings (metadata)" in report
    assert tools.has_rows(modules) and not tools.has_rows(tools.table(tools.MODULE_HEADERS, []))


def test_inspect_without_a_base_and_against_the_wrong_family(lora, tiny_sdxl_dir):
    status, _, _, modules = tools.inspect(str(lora), "")
    assert "Give a base model" in status and rows(modules)

    status, report, _, _ = tools.inspect(str(lora), str(tiny_sdxl_dir))
    assert "nk-error" in status and "do not match" in status
    assert "unmatched:" in report


@pytest.mark.parametrize("file, message", [("", "Choose the LoRA file"), ("/nowhere/x.safetensors", "Cannot inspect")])
def test_inspect_refusals_are_status_lines(file, message):
    status, report, settings, modules = tools.inspect(file)
    assert message in status and "nk-error" in status and report == ""
    assert not tools.has_rows(settings) and not tools.has_rows(modules)


def test_resize_writes_a_file_and_refuses_to_overwrite_unless_told(lora, tmp_path):
    from trainer.tools import inspect_lora

    out = tmp_path / "small.safetensors"
    status, report = tools.resize(str(lora), str(out), 2, conv_rank=1)
    assert "Saved" in status and out.is_file() and "Resized" in report
    assert {m.rank for m in inspect_lora(out).modules} == {1, 2}

    status, _ = tools.resize(str(lora), str(out), 3)
    assert "already exists" in status and "nk-error" in status
    status, _ = tools.resize(str(lora), str(out), 3, overwrite=True)
    assert "Saved" in status and {m.rank for m in inspect_lora(out).modules} == {2, 3}  # conv modules stay at 2


def test_resize_default_name_dynamic_method_and_bad_values(lora, tmp_path):
    import shutil

    source = tmp_path / "mine.safetensors"
    shutil.copy(lora, source)
    status, _ = tools.resize(str(source), "", 2, method="sv_fro", param=0.9)
    assert "Saved" in status and list(tmp_path.glob("mine-*.safetensors"))
    assert "Dynamic parameter is empty" in tools.resize(str(source), "", 2, method="sv_ratio", param=None)[0]
    assert "positive dynamic parameter" in tools.resize(str(source), "", 2, method="sv_ratio", param=-1)[0]
    assert "New rank is empty" in tools.resize(str(source), "", None)[0]
    assert "Choose the LoRA file" in tools.resize("", "", 2)[0]


def test_merge_then_extract_round_trip(lora, tiny_sd1_dir, tmp_path):
    from trainer.tools import inspect_lora

    logged = []
    merged = tmp_path / "merged"
    status, report = tools.merge(str(tiny_sd1_dir), [(str(lora), 1.0), ("", 1.0), ("  ", 0.5)], str(merged),
                                 ".safetensors", log=logged.append)
    assert "Saved" in status, status
    assert (tmp_path / "merged.safetensors").is_file() and "Merged checkpoint" in report
    assert any("merging" in line for line in logged)

    out = tmp_path / "extracted.safetensors"
    status, report = tools.extract(str(tmp_path / "merged.safetensors"), str(tiny_sd1_dir), str(out), 4, conv_rank=2)
    assert "Saved" in status, status
    assert out.is_file() and "Extracted LoRA" in report
    assert {m.rank for m in inspect_lora(out).modules} <= {2, 4}
    assert "already exists" in tools.extract(str(tmp_path / "merged.safetensors"), str(tiny_sd1_dir), str(out), 4)[0]


def test_merge_and_extract_refusals(lora, tiny_sd1_dir, tmp_path):
    assert "at least one LoRA file" in tools.merge(str(tiny_sd1_dir), [("", 1.0)], str(tmp_path / "m"))[0]
    assert "the base model" in tools.merge("", [(str(lora), 1.0)], str(tmp_path / "m"))[0]
    status, _ = tools.merge(str(tiny_sd1_dir), [(str(lora), 1.0)], str(tmp_path / "m.ckpt"), ".safetensors")
    assert "ends in .ckpt" in status and not (tmp_path / "m.ckpt").exists()
    assert "the fine-tuned model" in tools.extract("", str(tiny_sd1_dir), str(tmp_path / "x.safetensors"), 4)[0]
    status, _ = tools.extract(str(tiny_sd1_dir), str(tiny_sd1_dir), str(tmp_path / "x.safetensors"), 4)
    assert "Not extracted" in status and "nothing to extract" in status


@pytest.mark.parametrize("out, fmt, expected", [
    ("/m/x", ".safetensors", "/m/x.safetensors"), ("/m/x.ckpt", ".ckpt", "/m/x.ckpt"),
    ("/m/x.v1", ".ckpt", "/m/x.v1.ckpt"),
])
def test_checkpoint_path_adds_the_chosen_suffix(out, fmt, expected):
    assert tools.checkpoint_path(out, fmt) == expected


@pytest.mark.parametrize("method", sorted(tools.DYNAMIC_DEFAULTS))
def test_each_dynamic_method_works_with_the_parameter_the_page_fills_in(lora, tmp_path, method):
    status, report = tools.resize(str(lora), str(tmp_path / "d.safetensors"), 4, method=method,
                                  param=tools.DYNAMIC_DEFAULTS[method])
    assert "Saved" in status and method in report
