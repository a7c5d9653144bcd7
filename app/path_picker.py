"""📂 / 📄 pickers next to path fields: browse the SERVER's folders (the GUI may run on another machine)
and fill the field with the chosen folder or file.

Browsing stays within the allowed roots: ``$NEKOYA_BROWSE_ROOTS`` (folders separated by ``os.pathsep``)
when set; otherwise the user's home, the Nekoya folder and the folders already typed in path fields.
Every path is resolved (symlinks, ``..``) before it is listed or chosen, so nothing outside the
roots is ever listed. The logic is plain functions; ``build_picker`` / ``wire_pickers`` make widgets.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import gradio as gr

ROOTS_ENV = "NEKOYA_BROWSE_ROOTS"
NEKOYA_FOLDER = Path(__file__).resolve().parent.parent
FOLDER_KINDS = {"folder", "path"}  # kinds whose value may be a folder ("path": a model file or a diffusers folder)
FILE_KINDS = {"file", "path"}
BUTTON_LABELS = {"folder": "📂", "file": "📄", "path": "📄"}
MAX_ENTRIES = 1000  # a huge folder lists its first entries; the field can still be typed


@dataclass
class Listing:
    """What the picker shows: a folder ("" for the list of roots), its entries as (label, path), a message."""

    folder: str
    entries: list[tuple[str, str]] = field(default_factory=list)
    message: str = ""


def browse_roots(typed: Iterable[str] = ()) -> list[Path]:
    """The resolved folders browsing may enter; ``typed``: the values of the path fields."""
    configured = os.environ.get(ROOTS_ENV, "").strip()
    if configured:
        candidates = [Path(p) for p in configured.split(os.pathsep) if p.strip()]
    else:
        candidates = [Path.home(), NEKOYA_FOLDER, *filter(None, (_folder_of(t) for t in typed))]
    roots: list[Path] = []
    for candidate in candidates:
        real = _resolve(candidate)
        if real is not None and real.is_dir() and real not in roots:
            roots.append(real)
    return roots


def allowed(path: str | Path, roots: Sequence[Path]) -> Path | None:
    """The resolved path when it exists within a root, else None (symlinks and ``..`` resolved first)."""
    real = _resolve(Path(path))
    return real if real is not None and any(real == r or r in real.parents for r in roots) else None


def list_folder(folder: str, kind: str, roots: Sequence[Path]) -> Listing:
    """The entries of ``folder`` (folders first; files too unless ``kind`` is "folder"); the roots for ""."""
    if not (folder or "").strip():
        return Listing("", [(f"📁 {root}", str(root)) for root in roots])
    real = allowed(folder, roots)
    if real is None or not real.is_dir():
        return Listing("", list_folder("", kind, roots).entries, f"{folder} is not a folder you can browse here; "
                       f"pick one of the allowed folders (set {ROOTS_ENV} on the server for others)")
    try:
        children = sorted((c for c in real.iterdir() if not c.name.startswith(".")),
                          key=lambda c: (not c.is_dir(), c.name.lower()))
    except OSError as err:
        return Listing(str(real), [], f"cannot list {real}: {err.strerror or err}")
    entries = []
    for child in children[:MAX_ENTRIES]:
        if allowed(child, roots) is None:  # a symlink out of the roots (or a broken one): never shown
            continue
        if child.is_dir():
            entries.append((f"📁 {child.name}/", str(child)))
        elif kind != "folder":
            entries.append((f"📄 {child.name}", str(child)))
    return Listing(str(real), entries)


def start_listing(value: str, kind: str, roots: Sequence[Path]) -> Listing:
    """Where a picker opens: the field's folder (a file's folder) when it may be browsed, else the roots."""
    folder = _folder_of(value)
    return list_folder(str(folder) if folder is not None and allowed(folder, roots) else "", kind, roots)


def parent_listing(folder: str, kind: str, roots: Sequence[Path]) -> Listing:
    """One folder up; the roots when ``folder`` is a root (or not allowed)."""
    real = allowed(folder, roots) if (folder or "").strip() else None
    if real is None or real in roots:
        return list_folder("", kind, roots)
    return list_folder(str(real.parent), kind, roots)


def choose(folder: str, selected: str | None, kind: str, roots: Sequence[Path]) -> tuple[str | None, str]:
    """(value for the field, message): the selected entry, else the open folder where the field takes folders."""
    target = selected or folder
    if not (target or "").strip():
        return None, "Open a folder first" + ("" if kind in FOLDER_KINDS else ", then select a file")
    real = allowed(target, roots)
    if real is None:
        return None, f"{target} is outside the folders you can browse here"
    if real.is_dir() and kind not in FOLDER_KINDS:
        return None, "This field takes a file: select one in the list"
    if real.is_file() and kind not in FILE_KINDS:
        return None, "This field takes a folder: open it, then choose it"
    return str(real), ""


def _resolve(path: Path) -> Path | None:
    try:
        return path.expanduser().resolve(strict=True)
    except (OSError, RuntimeError):  # missing, unreadable, or a symlink loop
        return None


def _folder_of(value: str | None) -> Path | None:
    value = (value or "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_dir() else path.parent if path.is_file() else None


# ---- widgets ------------------------------------------------------------------------------------------


@dataclass
class PathPicker:
    kind: str
    field: gr.Textbox
    open: gr.Button
    panel: gr.Column
    folder: gr.Dropdown  # the open folder: pick a root or type a folder within one
    entries: gr.Dropdown  # picking a folder opens it; picking a file selects it
    up: gr.Button
    choose: gr.Button
    close: gr.Button
    note: gr.HTML


def build_picker(kind: str, make_field, elem_id: str) -> PathPicker:
    """A path field (``make_field()`` builds the textbox) with its picker button and a hidden browsing panel."""
    with gr.Column(min_width=320, elem_classes=["nk-path-field"]):
        with gr.Row(equal_height=True, elem_classes=["nk-path-row"]):
            box = make_field()
            open_button = gr.Button(BUTTON_LABELS[kind], elem_id=f"{elem_id}_browse", scale=0, min_width=44,
                                    elem_classes=["nk-icon-button"])
        with gr.Column(visible=False, elem_id=f"{elem_id}_picker", elem_classes=["nk-picker"]) as panel:
            folder = gr.Dropdown(label="Folder on the server", choices=[], value="", allow_custom_value=True,
                                 filterable=True, elem_id=f"{elem_id}_folder")
            entries = gr.Dropdown(label="Open a folder, or select a file" if kind in FILE_KINDS else "Open a folder",
                                  choices=[], value=None, filterable=True, allow_custom_value=True,
                                  elem_id=f"{elem_id}_entries")  # every value is checked by the handlers
            with gr.Row(equal_height=True):
                up = gr.Button("⬆ Up", size="sm", elem_id=f"{elem_id}_up", min_width=80)
                label = "Choose" if kind == "file" else "Choose this folder" if kind == "folder" else "Choose (file or folder)"
                choose_button = gr.Button(label, size="sm", variant="primary", elem_id=f"{elem_id}_choose", min_width=120)
                close = gr.Button("Close", size="sm", elem_id=f"{elem_id}_close", min_width=80)
            note = gr.HTML(elem_id=f"{elem_id}_picker_note")
    return PathPicker(kind, box, open_button, panel, folder, entries, up, choose_button, close, note)


def wire_pickers(pickers: Sequence[PathPicker]) -> None:
    """Bind each picker; the roots are worked out on the server at every call, from all path fields' values."""
    typed = [p.field for p in pickers]
    for picker in pickers:
        _wire_picker(picker, typed)


def _wire_picker(p: PathPicker, typed: list[gr.Textbox]) -> None:
    view = [p.panel, p.folder, p.entries, p.note]

    def show(listing: Listing, roots: Sequence[Path]):
        return [gr.update(visible=True), gr.update(value=listing.folder, choices=[str(r) for r in roots]),
                gr.update(choices=listing.entries, value=""), note_html(listing.message)]

    def opened(value, *typed_values):
        roots = browse_roots(typed_values)
        return show(start_listing(value, p.kind, roots), roots)

    def went(folder, *typed_values):
        roots = browse_roots(typed_values)
        return show(list_folder(folder, p.kind, roots), roots)

    def picked(folder, selected, *typed_values):
        roots = browse_roots(typed_values)
        real = allowed(selected, roots) if selected else None
        if real is not None and real.is_dir():
            return show(list_folder(str(real), p.kind, roots), roots)
        return [gr.skip(), gr.skip(), gr.skip(), note_html(f"Selected {Path(selected).name}: press Choose" if real else "")]

    def went_up(folder, *typed_values):
        roots = browse_roots(typed_values)
        return show(parent_listing(folder, p.kind, roots), roots)

    def chosen(folder, selected, *typed_values):
        value, message = choose(folder, selected, p.kind, browse_roots(typed_values))
        if value is None:
            return [gr.skip(), gr.skip(), note_html(message)]
        return [value, gr.update(visible=False), ""]

    quiet = dict(show_progress="hidden")
    p.open.click(opened, inputs=[p.field, *typed], outputs=view, **quiet)
    p.folder.input(went, inputs=[p.folder, *typed], outputs=view, **quiet)
    p.entries.input(picked, inputs=[p.folder, p.entries, *typed], outputs=view, **quiet)
    p.up.click(went_up, inputs=[p.folder, *typed], outputs=view, **quiet)
    p.choose.click(chosen, inputs=[p.folder, p.entries, *typed], outputs=[p.field, p.panel, p.note], **quiet)
    p.close.click(lambda: gr.update(visible=False), outputs=p.panel, **quiet)


def note_html(message: str) -> str:
    """A short note under a control (empty: nothing to say)."""
    return f'<div class="nk-note">{html.escape(message)}</div>' if message else ""
