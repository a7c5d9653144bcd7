"""Render a ``RunSnapshot`` for the page: the status block (progress, speed, memory, loss chart),
the run's output (files, log tail) and the message that ends a run.

Pure functions from a snapshot to HTML (inline SVG for the chart: it draws the
same in every browser, headless ones included). No gradio here.
"""
from __future__ import annotations

import html
import math
import time
from pathlib import Path

from trainer.events import Memory

from .run_manager import RunSnapshot

STATUS_TEXT = {
    "idle": "No run yet", "starting": "Starting…", "running": "Training", "stopping": "Stopping…",
    "pausing": "Pausing…", "paused": "Paused",
    "finished": "Finished", "stopped": "Stopped", "error": "Failed",
}
CHART_W, CHART_H, PAD_L, PAD_R, PAD_T, PAD_B = 640, 180, 52, 12, 12, 26  # wide and low: a laptop screen shows it all
MAX_CHART_POINTS = 400
CHART_MARGIN = 0.08  # of the loss range, between the curve and the lowest/highest gridline
LOG_TAIL = 60  # lines, not log entries: an entry may hold several


def render_live(snap: RunSnapshot, now: float | None = None) -> str:
    """The status block: what a glance during a run needs (progress, loss, speed, memory, the error)."""
    now = now or time.time()
    if snap.status == "idle":
        return '<div class="nk-live nk-idle" id="nk-live" data-status="idle">No training has run yet. Set the folders, check the plan, then press <b>Start training</b>.</div>'
    active = " nk-live-active" if snap.active else ""  # the column keeps an active run's block in view (style.css)
    parts = [
        f'<div class="nk-live{active}" id="nk-live" data-status="{snap.status}" data-step="{snap.step}" data-total="{snap.total_steps}">',
        _header(snap),
        _progress(snap),
        _pause(snap),
        _stats(snap, now),
        _error(snap),
        '<div class="nk-chart-title">Loss</div>' + loss_chart_svg(snap.losses, snap.total_steps),
        "</div>",
    ]
    return "".join(parts)


def render_run_output(snap: RunSnapshot) -> str:
    """What the run wrote: its files and its log tail (below the samples and the plan)."""
    if snap.status == "idle":
        return ""
    return f'<div class="nk-run-output">{_files(snap)}{_log_tail(snap)}</div>'


def final_message(snap: RunSnapshot) -> tuple[str, str] | None:
    """(text, kind) that replaces "Training started." once the run has ended; None while it goes."""
    if snap.active or snap.status == "idle":
        return None
    if snap.status == "error":
        reason = snap.error.message if snap.error else "see the log"
        return f"Failed at step {snap.step}: {reason}", "error"
    saved = f" Saved {Path(snap.saved[-1].path).name}." if snap.saved else ""
    kind = "ok" if snap.status == "finished" else "info"
    return f"{STATUS_TEXT.get(snap.status, snap.status)} at step {snap.step} / {snap.total_steps or '?'}.{saved}", kind


def _header(snap: RunSnapshot) -> str:
    device = f' · on {html.escape(snap.started.device)}' if snap.started else ""
    name = f' · output “{html.escape(snap.output_name)}”' if snap.output_name else ""
    return (
        f'<div class="nk-live-head"><span class="nk-pill nk-pill-{snap.status}" id="nk-run-status">'
        f"{STATUS_TEXT.get(snap.status, snap.status)}</span>"
        f'<span class="nk-muted">run {snap.run_id}{name}{device}</span></div>'
    )


def _progress(snap: RunSnapshot) -> str:
    pct = snap.progress * 100
    total = snap.total_steps or "?"
    epoch = ""
    if snap.last_step:
        epoch = f" · epoch {snap.last_step.epoch} / {snap.last_step.total_epochs}"
    elif snap.started:
        epoch = f" · {snap.started.total_epochs} epoch(s)"
    return (
        f'<div class="nk-progress"><div class="nk-progress-bar nk-bar-{snap.status}" style="width:{pct:.1f}%"></div>'
        f'<div class="nk-progress-text" id="nk-progress-text">{pct:.0f}% · step {snap.step} / {total}{epoch}</div></div>'
    )


def _pause(snap: RunSnapshot) -> str:
    """While paused: where, and what the pause did (model kept loaded, or its memory freed)."""
    if snap.status != "paused" or snap.paused is None:
        return ""
    note = f" · {html.escape(snap.paused.note)}" if snap.paused.note else ""
    return (f'<div class="nk-paused" id="nk-paused"><b>Paused at step {snap.paused.step}</b>{note}. '
            "Press <b>Resume</b> to go on, or <b>Stop training</b> to save and end.</div>")


def _eta(snap: RunSnapshot) -> str:
    step = snap.last_step
    if snap.status == "paused":
        return "paused"  # the speed stays the one before the pause; no time runs out meanwhile
    if step and snap.active:
        return format_duration(step.eta_s)
    return "done" if snap.status == "finished" else "–"


def _stats(snap: RunSnapshot, now: float) -> str:
    step = snap.last_step
    cells = [
        ("Loss", f"{step.loss:.4f}" if step else "–"),
        ("Avg loss", f"{step.avg_loss:.4f}" if step else "–"),
        ("Speed", f"{step.it_per_s:.2f} it/s" if step else "–"),
        ("ETA", _eta(snap)),
        ("Elapsed", format_duration(snap.elapsed_s(now))),
        ("Learning rate", _lrs(step) if step else "–"),
    ]
    memory = memory_cell(snap.memory, step.ranks if step else ())
    items = "".join(_stat_cell(k, v) for k, v in cells) + _stat_cell(*memory, elem_id="nk-memory-cell")
    return f'<div class="nk-stats">{items}</div>'


def _stat_cell(title: str, value: str, elem_id: str = "") -> str:
    id_attr = f' id="{elem_id}"' if elem_id else ""
    return (f'<div class="nk-stat nk-stat-{title.split()[0].lower()}"{id_attr}><div class="nk-stat-k">{title}</div>'
            f'<div class="nk-stat-v">{html.escape(value)}</div></div>')


def _lrs(step) -> str:
    if len(step.lrs) > 1:
        return " · ".join(f"{name} {lr:.2e}" for name, lr in step.lrs.items())
    return f"{step.lr:.2e}"


def _error(snap: RunSnapshot) -> str:
    if not snap.error:
        return ""
    from trainer.settings import is_setting, setting_info  # light: settings are loaded already

    err = snap.error
    where = ""
    if err.field and is_setting(err.field):
        info = setting_info(err.field)
        where = f'<div class="nk-field">Fix: {html.escape(info.tab)} › {html.escape(info.label)}</div>'
    hint = f'<div class="nk-hint">{html.escape(err.hint)}</div>' if err.hint else ""
    return f'<div class="nk-run-error" id="nk-run-error"><b>Training failed:</b> {html.escape(err.message)}{where}{hint}</div>'


def _files(snap: RunSnapshot) -> str:
    if not snap.saved:
        return '<div class="nk-files nk-muted">No file saved yet.</div>'
    items = "".join(
        f'<li><span class="nk-kind">{html.escape(s.kind)}</span> <code title="{html.escape(s.path)}">{html.escape(Path(s.path).name)}</code>'
        f' <span class="nk-muted">step {s.step} · {html.escape(str(Path(s.path).parent))}</span></li>'
        for s in snap.saved
    )
    return f'<div class="nk-files"><div class="nk-chart-title">Saved files</div><ul id="nk-saved-files">{items}</ul></div>'


def _log_tail(snap: RunSnapshot) -> str:
    # Lines in reverse inside a column-reverse box: they read top to bottom and the box
    # starts scrolled to the newest line, with no script. Each line is one row of text
    # (no wrapping) and the box is a whole number of rows high, so its top is a line's start.
    lines = "".join(f"<div>{html.escape(line)}</div>" for line in reversed(log_tail_lines(snap.log)))
    return f'<details class="nk-log" open><summary>Log</summary><div class="nk-logbox" id="nk-log">{lines}</div></details>'


def log_tail_lines(log: tuple[str, ...], limit: int = LOG_TAIL) -> list[str]:
    """The last ``limit`` lines of the log, cut at line breaks (a multi-line entry is several lines)."""
    lines = [line for entry in log for line in (entry.splitlines() or [""])]
    return lines[-limit:]


def loss_chart_svg(losses: tuple[tuple[int, float, float], ...], total_steps: int) -> str:
    """Line chart of raw (thin) and smoothed (bold) loss against the step, as inline SVG."""
    box = f'viewBox="0 0 {CHART_W} {CHART_H}" class="nk-chart" id="nk-loss-chart" role="img" aria-label="loss chart"'
    if not losses:
        return f'<svg {box}><text x="{CHART_W / 2}" y="{CHART_H / 2}" text-anchor="middle" class="nk-chart-empty">waiting for the first step…</text></svg>'
    points = _downsample(losses, MAX_CHART_POINTS)
    values = [v for _, loss, avg in points for v in (loss, avg)]
    ticks = y_ticks(min(values), max(values))
    low, high = ticks[0], ticks[-1]
    # a gridline right on the curve's minimum reads as a floor the loss hit: leave that one out
    gridlines = [v for v in ticks if abs(v - min(values)) > (high - low) * 0.02]
    # The x axis spans the steps seen so far (the progress bar shows how far the run is),
    # so an early look at a long run still shows the curve's shape.
    first_x, last_x = points[0][0], max(points[-1][0], points[0][0] + 1)

    def y_of(value: float) -> float:
        return PAD_T + (CHART_H - PAD_T - PAD_B) * (1 - (value - low) / (high - low))

    def xy(step: int, value: float) -> str:
        x = PAD_L + (CHART_W - PAD_L - PAD_R) * ((step - first_x) / (last_x - first_x))
        return f"{x:.1f},{y_of(value):.1f}"

    raw = " ".join(xy(s, loss) for s, loss, _ in points)
    smooth = " ".join(xy(s, avg) for s, _, avg in points)
    bottom = CHART_H - PAD_B
    grid = "".join(
        f'<line x1="{PAD_L}" x2="{CHART_W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" class="nk-grid"/>'
        f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" class="nk-axis">{_fmt_loss(v)}</text>'
        for y, v in ((y_of(v), v) for v in gridlines)
    )
    return (
        f"<svg {box}>{grid}"
        f'<line x1="{PAD_L}" x2="{CHART_W - PAD_R}" y1="{bottom}" y2="{bottom}" class="nk-axis-line"/>'
        f'<text x="{PAD_L}" y="{CHART_H - 6}" class="nk-axis">step {first_x}</text>'
        f'<text x="{CHART_W - PAD_R}" y="{CHART_H - 6}" text-anchor="end" class="nk-axis">step {last_x}{_of_total(last_x, total_steps)}</text>'
        f'<polyline points="{raw}" class="nk-line-raw"/>'
        f'<polyline points="{smooth}" class="nk-line-avg"/>'
        f'<g class="nk-legend"><line x1="{CHART_W - 190}" x2="{CHART_W - 170}" y1="16" y2="16" class="nk-line-raw"/>'
        f'<text x="{CHART_W - 165}" y="20" class="nk-axis">loss</text>'
        f'<line x1="{CHART_W - 120}" x2="{CHART_W - 100}" y1="16" y2="16" class="nk-line-avg"/>'
        f'<text x="{CHART_W - 95}" y="20" class="nk-axis">average</text></g>'
        "</svg>"
    )


def _of_total(last: int, total: int) -> str:
    return f" of {total}" if total > last else ""


def _downsample(points, limit: int):
    """Every n-th point plus the last one, so long runs draw fast and the line still ends at the newest step."""
    if len(points) <= limit:
        return list(points)
    stride = len(points) / limit
    picked = [points[int(i * stride)] for i in range(limit)]
    return picked + [points[-1]] if picked[-1] != points[-1] else picked


def y_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """Gridline values at round numbers (1, 2, 2.5 or 5 times a power of ten), from below the lowest loss
    to above the highest, with a margin: no gridline lies on the curve's minimum, none looks like data."""
    if high - low < 1e-12:
        low, high = low - abs(low) * 0.1 - 1e-3, high + abs(high) * 0.1 + 1e-3
    margin = (high - low) * CHART_MARGIN
    step = _round_step((high - low + 2 * margin) / (count - 1))
    first = math.floor((low - margin) / step)
    if low >= 0 and first * step < 0:
        first = 0  # a loss is not negative: the axis starts at 0 rather than below it
    last = math.ceil((high + margin) / step)
    return [round(i * step, 12) for i in range(first, last + 1)]


def _round_step(raw: float) -> float:
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _fmt_loss(value: float) -> str:
    return f"{value:.3g}"


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def memory_cell(mem: Memory | None, ranks: tuple[Memory, ...] = ()) -> tuple[str, str]:
    """(title, value): GPU allocated / reserved of total on CUDA, the process's RAM otherwise; for a run of
    several processes, each one's ("rank 0: 3.10 GiB · rank 1: 3.08 GiB")."""
    if len(ranks) > 1:
        kind = "GPU memory" if ranks[0].allocated_mb is not None else "RAM"
        each = (_gib(m.allocated_mb if m.allocated_mb is not None else m.rss_mb) for m in ranks)
        return f"{kind} of {len(ranks)} processes", " · ".join(f"rank {i}: {v}" for i, v in enumerate(each))
    if mem is None:
        return "Memory", "–"
    if mem.allocated_mb is not None:
        return "GPU memory", format_memory(mem)
    return "RAM", format_memory(mem)


def format_memory(mem: Memory) -> str:
    if mem.allocated_mb is not None:
        total = f" of {_gib(mem.total_mb)}" if mem.total_mb else ""
        reserved = f" · {_gib(mem.reserved_mb)} reserved" if mem.reserved_mb is not None else ""
        return f"{_gib(mem.allocated_mb)} allocated{reserved}{total}"
    return _gib(mem.rss_mb)


def _gib(mb: float | None) -> str:
    if mb is None:
        return "?"
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def sample_gallery(snap: RunSnapshot) -> list[tuple]:
    """Gallery items for the run's samples, newest first. Images are read here (not passed as paths)
    because the output folder may lie outside what the web server is allowed to serve."""
    from PIL import Image

    items = []
    for sample in reversed(snap.samples):
        try:
            with Image.open(sample.path) as image:
                items.append((image.convert("RGB"), f"step {sample.step} · {sample.prompt}"))
        except OSError:
            continue  # deleted or half-written: the next poll shows it
    return items
