"""Time kohya's sd-scripts ``train_network.py`` the way ``bench/train_speed.py`` times Nekoya.

Run it with the sd-scripts environment's Python, not Nekoya's (it imports nothing from this repo):

    SD_SCRIPTS=/path/to/sd-scripts  /path/to/sdvenv/bin/python bench/sd_scripts_timing.py <train_network.py args...>

It runs ``train_network.py`` unchanged in this process. The only hook wraps ``tqdm.update`` of the
"steps" progress bar, which train_network calls once right after each optimizer step, to take a
wall-clock and a process-CPU stamp. It prints one line ``BENCH_JSON {...}`` with the same fields
as train_speed.py: s_per_step (median gap between steps, skipping the first two),
time_to_first_step_s (from this process's creation), peak_rss_mb (ru_maxrss), plus cpu_s_per_step.
``BENCH_CPROFILE=1`` also profiles the steps after warm-up and prints the top functions.
"""
from __future__ import annotations

import json
import os
import resource
import runpy
import sys
import time

import tqdm as tqdm_module
from process_clock import process_start_time  # bench/, next to this script

STARTED = process_start_time()
WARMUP_STEPS = 3
WALL: list[float] = []
CPU: list[float] = []
PROFILE = None
if os.environ.get("BENCH_CPROFILE"):
    import cProfile

    PROFILE = cProfile.Profile()

_original_update = tqdm_module.tqdm.update


def _stamping_update(self, n=1):
    if getattr(self, "desc", "") == "steps":  # the training bar; caching/validation bars have other names
        WALL.append(time.time())
        CPU.append(time.process_time())
        if PROFILE is not None and len(WALL) == WARMUP_STEPS:
            PROFILE.enable()
    return _original_update(self, n)


tqdm_module.tqdm.update = _stamping_update


def _median_gap(stamps: list[float]) -> float | None:
    gaps = sorted(b - a for a, b in zip(stamps[WARMUP_STEPS - 1:], stamps[WARMUP_STEPS:]))
    if not gaps:  # fewer than four steps: fall back to every gap, as train_speed.py does
        gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return round(gaps[len(gaps) // 2], 4) if gaps else None


def _print_profile() -> None:
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(PROFILE, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    print(text.getvalue())


def main() -> int:
    folder = os.environ.get("SD_SCRIPTS", "/tmp/sd-scripts")
    script = os.path.join(folder, "train_network.py")
    sys.argv = [script, *sys.argv[1:]]
    sys.path.insert(0, folder)
    os.chdir(folder)
    runpy.run_path(script, run_name="__main__")
    if PROFILE is not None:
        PROFILE.disable()
    import torch

    result = {
        "trainer": "sd-scripts", "steps": len(WALL), "s_per_step": _median_gap(WALL),
        "cpu_s_per_step": _median_gap(CPU),
        "time_to_first_step_s": round(WALL[0] - STARTED, 2) if WALL else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "gradient_checkpointing": "--gradient_checkpointing" in sys.argv,
        "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if result["s_per_step"]:
        result["it_per_s"] = round(1 / result["s_per_step"], 3)
    print("BENCH_JSON " + json.dumps(result), flush=True)
    if PROFILE is not None:
        _print_profile()
    return 0


if __name__ == "__main__":
    sys.exit(main())
