"""`lora inspect` (CLI and the Tools tab) of files that are not LoRAs: a clear refusal naming the file, no traceback."""
from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import save_file

from app import tools_actions
from trainer.cli import main


def not_loras(folder, base_model) -> dict:
    """name -> (path, what the refusal must say)."""
    save_file({"weight": torch.zeros(3), "lora_te_x.alpha": torch.tensor(1.0)}, str(folder / "random.safetensors"))
    (folder / "notes.txt").write_text("a caption, not a LoRA")
    (folder / "renamed.safetensors").write_text("hello")
    buffer = io.BytesIO()
    torch.save({"lora_te_x.lora_down.weight": torch.zeros(4, 8)}, buffer)
    (folder / "cut.pt").write_bytes(buffer.getvalue()[:300])
    (folder / "text.pt").write_text("not a pickle")
    return {
        "base model": (base_model, "it is a Stable Diffusion model checkpoint"),
        "random tensors": (folder / "random.safetensors", "no kohya LoRA modules"),
        "text file": (folder / "notes.txt", "LoRAs are .safetensors"),
        "text renamed": (folder / "renamed.safetensors", "cannot be read as .safetensors"),
        "truncated pickle": (folder / "cut.pt", "truncated or damaged"),
        "text as .pt": (folder / "text.pt", "or it is damaged"),
    }


CASES = ["base model", "random tensors", "text file", "text renamed", "truncated pickle", "text as .pt"]


@pytest.mark.parametrize("case", CASES)
def test_cli_inspect_of_a_non_lora_file_exits_1_with_a_message(case, tmp_path, tiny_sd1_file, capsys):
    path, reason = not_loras(tmp_path, tiny_sd1_file)[case]
    code = main(["lora", "inspect", str(path)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"error: {path.name} is not a LoRA file: ") and reason in err, err
    assert "Traceback" not in err and "weights_only" not in err


@pytest.mark.parametrize("case", CASES)
def test_tools_tab_inspect_of_a_non_lora_file_is_a_status_line(case, tmp_path, tiny_sd1_file):
    path, reason = not_loras(tmp_path, tiny_sd1_file)[case]
    status, report, _, modules = tools_actions.inspect(str(path))
    assert "nk-error" in status and f"{path.name} is not a LoRA file" in status and reason in status
    assert report == "" and not tools_actions.has_rows(modules)
