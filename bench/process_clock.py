"""When this process started, on the wall clock, to about 10 ms (stdlib only: the sd-scripts side uses it too).

psutil's ``create_time()`` adds the process's start tick to the boot time of
``/proc/stat``, which Linux gives in whole seconds: every start looks up to a second
earlier than it was (0.85 s on the machine of RESULTS.md). Taking the boot time as
``now - /proc/uptime`` instead removes that offset.
"""
from __future__ import annotations

import os
import time


def process_start_time() -> float:
    try:
        with open("/proc/self/stat") as stat:
            after_name = stat.read().rsplit(")", 1)[1].split()
        start_ticks = int(after_name[19])  # field 22 of stat(5); the list starts at field 3
        with open("/proc/uptime") as uptime:
            seconds_up = float(uptime.read().split()[0])
        return time.time() - seconds_up + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):  # not Linux: psutil's (coarser) figure
        import psutil

        return psutil.Process().create_time()
