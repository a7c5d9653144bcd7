"""``python -m trainer lora ...``: argument parsing, reports, JSON output and exit codes of each sub-command."""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_tools_support import one_thread, random_lora  # noqa: F401  (fixture)
from trainer.commands import lora_cmd


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def lora(folder, tiny_sd1_dir):
    return random_lora(folder, tiny_sd1_dir, "sd1_locon")


def run(*argv):
    """(exit code, stdout, stderr) of ``lora <argv>``."""
    parser = argparse.ArgumentParser(prog="trainer")
    lora_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lora", *map(str, argv)])
    out, err = io.StringIO(), io.StringIO()
    code = lora_cmd.run(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_lora_ratio_specs():
    assert lora_cmd.lora_with_ratio("a.safetensors:0.8") == ("a.safetensors", 0.8)
    assert lora_cmd.lora_with_ratio("a.safetensors:-0.5") == ("a.safetensors", -0.5)
    assert lora_cmd.lora_with_ratio("a.safetensors") == ("a.safetensors", 1.0)
    assert lora_cmd.lora_with_ratio(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)


def test_inspect_exit_code_says_whether_the_keys_match_the_base(lora, tiny_sd1_dir, tiny_sdxl_dir):
    code, out, _ = run("inspect", lora, "--base", tiny_sd1_dir)
    assert code == 0 and "91 modules" in out and "OK: 91 of 91 modules match" in out
    code, out, _ = run("inspect", lora, "--base", tiny_sdxl_dir, "--json")
    data = json.loads(out)
    assert code == 1 and data["verify"]["ok"] is False and len(data["lora"]["modules"]) == 91
    code, _, err = run("inspect", lora.parent / "missing.safetensors")
    assert code == 1 and err.startswith("error: LoRA file not found")


def test_resize_writes_next_to_the_input_by_default(folder, lora):
    code, out, _ = run("resize", lora, "--rank", "2", "--conv-rank", "1", "--save-precision", "fp16")
    target = folder / "sd1_locon-r2.safetensors"
    assert code == 0 and target.exists() and str(target) in out and "overall relative error" in out
    code, _, err = run("resize", lora, "--rank", "2")
    assert code == 1 and "already exists" in err
    code, out, _ = run("resize", lora, "--rank", "4", "--dynamic", "sv_fro", "--param", "0.9", "--json")
    data = json.loads(out)
    assert code == 0 and data["dynamic_method"] == "sv_fro"
    assert data["out_path"].endswith("sd1_locon-sv_fro0.9.safetensors")


def test_merge_and_extract(folder, lora, tiny_sd1_dir):
    merged = folder / "merged.safetensors"
    code, out, err = run("merge", "--base", tiny_sd1_dir, "--lora", f"{lora}:0.5", "-o", merged)
    assert code == 0 and merged.exists() and "×0.5 (91 modules)" in out and "loading" in err
    code, _, err = run("merge", "--base", tiny_sd1_dir, "--lora", lora, "-o", merged)
    assert code == 1 and "already exists" in err
    code, out, _ = run("merge", "--base", tiny_sd1_dir, "--lora", lora, "--lora", f"{lora}:-1", "-o",
                       folder / "half.ckpt", "--half", "--json")
    data = json.loads(out)
    assert code == 0 and data["dtype"] == "float16" and [m["ratio"] for m in data["loras"]] == [1.0, -1.0]
    code, out, _ = run("extract", "--base", tiny_sd1_dir, "--tuned", merged, "-o", folder / "extracted.safetensors",
                       "--rank", "4", "--conv-rank", "2", "--no-clamp", "--min-diff", "0")
    assert code == 0 and "extracted 91 modules at rank 4, conv rank 2 with the text encoder" in out


def test_the_command_module_imports_no_torch():
    code = ("import sys, trainer.commands.lora_cmd, trainer.tools; "
            "print(sorted({'torch', 'diffusers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_main_cli_runs_the_lora_command(lora, tiny_sd1_dir, capsys):
    from trainer.cli import main

    assert main(["lora", "inspect", str(lora), "--base", str(tiny_sd1_dir)]) == 0
    assert "OK: 91 of 91 modules match" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: a sub-command is required
        main(["lora"])
