"""Print training command (kohya_ss's button of that name): the form is written as a config file and the page
shows the ``python -m trainer train --config <file>`` line that runs the same settings headless.

The config goes to ``<Output folder>/<output_name>_<time>.json`` or to a path the user types; it is
written whole under a temporary name and then linked into place, so it is never half-written and
never replaces an existing file. Handler logic is plain Python (``print_train_command``).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import gradio as gr

from trainer.distributed.rules import GroupLayout, node_command
from trainer.safety import atomic_write_text
from trainer.settings import SettingsError, TrainingSettings, settings_to_json

from .binding import SettingsForm
from .form import settings_from_form
from .presets_panel import status_html
from .tab_common import USER_ERRORS, report_html, status_box, text
from .tensorboard_panel import TensorBoardPanel, build_tensorboard_panel, wire_tensorboard

# Auto names that are taken (a second press within the same second) get -2, -3...
MAX_NAME_TRIES = 100


@dataclass
class TrainCommandPanel:
    button: gr.Button
    target: gr.Textbox
    result: gr.HTML
    tensorboard: TensorBoardPanel  # Start/Stop TensorBoard on the Logging folder, below it


def build_train_command_panel() -> TrainCommandPanel:
    with gr.Row(equal_height=True, elem_classes=["nk-small-buttons"]):
        button = gr.Button("Print training command", size="sm", elem_id="print_command", scale=1, min_width=180)
        target = gr.Textbox(show_label=False, elem_id="print_command_file", scale=3, max_lines=1, container=False,
                            placeholder="config file to write (empty: <Output folder>/<name>_<time>.json)")
    result = status_box("print_command_result")
    return TrainCommandPanel(button, target, result, build_tensorboard_panel())


def wire_train_command(panel: TrainCommandPanel, form: SettingsForm) -> None:
    def handler(data):
        try:
            result = print_train_command(form.values(data), form.kept_values(data), data[panel.target])
        except (SettingsError, *USER_ERRORS) as err:
            return refusal_html(err)
        return result_html(result)

    panel.button.click(handler, inputs=form.inputs(panel.target), outputs=panel.result, show_progress="hidden")
    wire_tensorboard(panel.tensorboard, form.components["logging_dir"])


@dataclass(frozen=True)
class TrainCommand:
    config: Path
    train: str  # the shell line that trains with the config
    check: str  # the shell line that runs the preflight check only
    nodes: str = ""  # several machines: what each machine runs (torchrun)


def print_train_command(values: Mapping[str, Any], kept: Mapping[str, Any] | None, target: str = "",
                        now: datetime | None = None) -> TrainCommand:
    """Validate the form, write its config file and return the commands that use it.

    Raises SettingsError (bad fields, each named) or ValueError (no place to write, the file exists).
    """
    settings = settings_from_form(values, kept)
    content = settings_to_json(settings)
    if text(target):
        path = _typed_target(Path(text(target)).expanduser(), settings, now)
        _write_new(path, content)
    else:
        path = _write_auto_named(settings, content, now)
    path = path.resolve()
    layout = GroupLayout.of(settings)
    nodes = node_command(layout, shlex.quote(str(path))) if layout.machines > 1 else ""
    return TrainCommand(path, shell_line("train", path), shell_line("check", path), nodes)


def shell_line(command: str, config: Path) -> str:
    """The command line for this platform, run from the GUI's folder (relative paths in the form mean the same)."""
    args = [sys.executable, "-m", "trainer", command, "--config", str(config)]
    if os.name == "nt":
        return f'cd /d "{os.getcwd()}" && {subprocess.list2cmdline(args)}'
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(args)}"


def result_html(result: TrainCommand) -> str:
    intro = status_html([f"Wrote {result.config}. Run the same training headless with:"], [])
    lines = f"{result.train}\n\n# only the preflight check:\n{result.check}"
    if result.nodes:
        lines = (f"# on every machine, from the Nekoya folder (R = 0 on the machine at HOST, 1, 2 … on the "
                 f"others; the config, model and images at the same paths):\n{result.nodes}\n\n"
                 f"# only the preflight check:\n{result.check}")
    return intro + report_html(lines, "nk-report nk-command")


def refusal_html(err: Exception) -> str:
    problems = err.lines if isinstance(err, SettingsError) else [str(err)]
    return status_html([], ["No command printed: " + problems[0], *problems[1:]])


def _default_name(settings: TrainingSettings, now: datetime | None, attempt: int) -> str:
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{settings.output_name}_{stamp}" + (f"-{attempt}" if attempt > 1 else "") + ".json"


def _typed_target(path: Path, settings: TrainingSettings, now: datetime | None) -> Path:
    if path.is_dir():
        return path / _default_name(settings, now, 1)
    return path if path.suffix.lower() == ".json" else path.with_name(path.name + ".json")


def _write_auto_named(settings: TrainingSettings, content: str, now: datetime | None) -> Path:
    if not settings.output_dir.strip():
        raise ValueError("the Output folder (Folders tab) is empty: set it, or type where to write the config file")
    folder = Path(settings.output_dir.strip()).expanduser()
    for attempt in range(1, MAX_NAME_TRIES + 1):
        path = folder / _default_name(settings, now, attempt)
        try:
            _write_new(path, content)
            return path
        except FileExistsError:
            continue
    raise ValueError(f"{folder} already has {MAX_NAME_TRIES} configs named for this second; try again")


def _write_new(path: Path, content: str) -> None:
    """Write a whole new file; FileExistsError (a ValueError's sibling, named) when the path is taken."""
    if path.exists():
        raise FileExistsError(f"{path} already exists: type another file name (it is never overwritten)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the folder {path.parent}: {err.strerror or err}") from None
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    atomic_write_text(temporary, content)  # the whole file, under a name nothing reads
    try:
        os.link(temporary, path)  # fails when the path was taken meanwhile: never replaces a file
    except FileExistsError:
        raise FileExistsError(f"{path} already exists: type another file name (it is never overwritten)") from None
    except OSError:  # a file system without hard links: rename, after the check above
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
