"""What the Try it, Tools and Dataset Preparation tabs share: named fields, prefilled paths,
reports, user-facing errors and the one image model of the GUI process.

No training or image logic here: the tabs call ``trainer.inference``, ``trainer.tools``
and ``trainer.dataset_prep``; this module only adapts them to widgets.
"""
from __future__ import annotations

import html
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from trainer.problems import NekoyaError

from .presets_panel import status_html

# Errors the backends raise with a message meant for the user (ToolError, DatasetPrepError,
# CheckpointError and LoraMismatchError are ValueErrors; SaveError is an OSError; DeviceBusy a NekoyaError).
USER_ERRORS = (ValueError, OSError, NekoyaError)
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")
REFRESH_LABEL = "🔄"
LORA_LIST_INFO = "Every LoRA in the Output folder and the run's files, newest first (🔄 reads the folder again); or type a path."
ProgressFn = Callable[[int, int], None]


class NamedFields:
    """A tab's widgets by name: Gradio's component-keyed dicts in and out, by name (as ``SettingsForm``)."""

    def __init__(self, components: Mapping[str, Any]):
        self.components = dict(components)
        self._names = {id(c): name for name, c in self.components.items()}

    def __getitem__(self, name: str):
        return self.components[name]

    def inputs(self, *extra) -> set:
        return {*self.components.values(), *extra}

    def values(self, data: Mapping[Any, Any]) -> dict[str, Any]:
        return {self._names[id(c)]: v for c, v in data.items() if id(c) in self._names}

    def updates(self, values: Mapping[str, Any]) -> dict:
        return {self.components[name]: value for name, value in values.items()}


def follow(current: str | None, last_prefill: str | None, new_value: str | None) -> str:
    """A prefilled field follows its source until the user types something else into it."""
    current = (current or "").strip()
    if not current or current == (last_prefill or "").strip():
        return new_value or ""
    return current


def text(value: Any) -> str:
    return str(value or "").strip()


def problem(message: str) -> str:
    return status_html([], [message])


def done(message: str, warnings: list[str] = ()) -> str:
    return status_html([message], [], list(warnings))


def report_html(report: str, elem_class: str = "nk-report") -> str:
    """A backend's ``format()`` text, kept as it is (aligned columns) in a scrolling box."""
    return f'<pre class="{elem_class}">{html.escape(report.rstrip())}</pre>' if report else ""


def status_box(elem_id: str):
    """An HTML block for messages; hidden by the page's CSS while empty."""
    import gradio as gr

    return gr.HTML(elem_id=elem_id, elem_classes=["nk-status-box"])


def lora_files(saved_paths: list[str], output_dir: str | None = None) -> list[str]:
    """LoRA files to offer: the run's saved files (newest first), then every LoRA in the output folder (newest first)."""
    found = [p for p in reversed(saved_paths) if Path(p).suffix.lower() in LORA_SUFFIXES]
    return list(dict.fromkeys(found + output_folder_loras(output_dir)))


def output_folder_loras(output_dir: str | None) -> list[str]:
    """Every LoRA file in the output folder, newest first: earlier runs' epochs too, after a restart."""
    folder = Path(text(output_dir)).expanduser() if text(output_dir) else None
    try:
        stamped = [(p.stat().st_mtime, str(p)) for p in folder.iterdir() if p.is_file() and _is_lora(p)] if folder else []
    except OSError:  # missing or unreadable folder: nothing to offer (preflight names the problem)
        return []
    return [path for _, path in sorted(stamped, reverse=True)]


def _is_lora(path: Path) -> bool:
    """A .safetensors file with LoRA weights (not a merged checkpoint); a pickle LoRA cannot be told without loading."""
    from trainer.preflight.network import lora_ranks

    if path.suffix.lower() not in LORA_SUFFIXES:
        return False
    try:
        return lora_ranks(path, deep=False) != set()
    except ValueError:
        return False


def saved_lora_paths(snapshot) -> list[str]:
    """Files the current (or last) run saved, oldest first, without state folders."""
    return [s.path for s in snapshot.saved if s.kind != "state"]


def progress_reporter(progress, unit: str) -> ProgressFn:
    """(done, total) callbacks into a ``gr.Progress`` (or any callable taking the same arguments)."""

    def report(done_count: int, total: int) -> None:
        if progress is not None and total:
            progress((done_count, total), desc=f"{done_count}/{total} {unit}", unit=unit)

    return report


class ImageModels:
    """The GUI's one ``TryIt`` (base model cache), shared by Try it and the regularisation images.

    Created on first use so the page starts without torch. Library notes (e.g. LoRA keys
    that match no layer) are collected per calling thread, for the page that asked.
    """

    def __init__(self, device: str | None = None):
        self.device = device  # None: CUDA when there is one
        self._tryit = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self.stop_requested = threading.Event()  # for long batches (regularisation images)

    @property
    def tryit(self):
        with self._lock:
            if self._tryit is None:
                from trainer.inference.tryit import TryIt

                self._tryit = TryIt(device=self.device, log=self._log)
            return self._tryit

    @property
    def loaded(self) -> bool:
        return self._tryit is not None and self._tryit.model is not None

    def unload(self) -> str:
        if not self.loaded:
            return "No model was loaded."
        self._tryit.unload()
        return "The Try it model was unloaded; its memory is free."

    @contextmanager
    def notes(self) -> Iterator[list[str]]:
        """Collect the warnings logged by the backend during the ``with`` block on this thread."""
        collected: list[str] = []
        self._local.notes = collected
        try:
            yield collected
        finally:
            self._local.notes = None

    def _log(self, message: str, level: str = "info") -> None:
        notes = getattr(self._local, "notes", None)
        if notes is not None and level != "info":
            notes.append(message)


def number(value: Any, label: str, cast: Callable[[Any], Any] = int):
    """A number box's value, or ValueError naming the box (an emptied box gives None)."""
    if value is None or value == "":
        raise ValueError(f"{label} is empty; type a number")
    try:
        return cast(float(value)) if cast is int else cast(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a number, not {value!r}") from None


MODEL_FILE_SETTINGS = ("clip_l", "t5xxl", "ae")  # kohya_ss's Flux fields: a transformer file's separate parts
SD3_FILE_SETTINGS = ("sd3_clip_l", "clip_g", "sd3_t5xxl")  # kohya_ss's SD3 fields: a SAI file's separate encoders
# the model checkbox whose separate part files go with image generation, and those files' settings
PART_FILES = {"flux1_checkbox": MODEL_FILE_SETTINGS, "sd3_checkbox": SD3_FILE_SETTINGS}
MODEL_FILE_INPUTS = tuple(name for box, files in PART_FILES.items() for name in (box, *files))  # form values to read


def model_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """clip_skip, v_parameterization and the separate part files of a FLUX transformer file or an SD3 SAI file for
    image generation, from the settings form's values (only those of the ticked model box)."""
    files = tuple((name, str(flags.get(name) or "").strip()) for box, names in PART_FILES.items()
                  if flags.get(box) for name in names)
    return {"clip_skip": max(1, int(flags.get("clip_skip") or 1)),
            "v_parameterization": True if flags.get("v_parameterization") else None,
            "model_files": tuple((name, value) for name, value in files if value)}
