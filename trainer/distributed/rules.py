"""What a multi-process run's settings mean, without torch: GPU ids, ports, torchrun's arguments.

kohya_ss starts its processes with ``accelerate launch``; Nekoya starts the same group with ``torchrun``.
This module maps kohya's Accelerate launch settings (and the extra flags that have a torchrun meaning) onto
torchrun's command line, and says which do not map.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any

from trainer.problems import NekoyaError

DEFAULT_PORT = 29500  # accelerate's and torchrun's default
# the environment torchrun gives each worker
WORKER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
GROUP_DIR_ENV = "NEKOYA_GROUP_DIR"  # where a group started by Nekoya exchanges events and commands

# accelerate launch flag -> (torchrun flag or "" when it needs no flag, takes a value)
_MAPPED = {
    "--machine_rank": ("--node_rank", True),
    "--main_process_ip": ("--master_addr", True),
    "--rdzv_backend": ("--rdzv_backend", True),
    "--rdzv_conf": ("--rdzv_conf", True),
    "--max_restarts": ("--max_restarts", True),
    "--monitor_interval": ("--monitor_interval", True),
    "--same_network": ("", False),  # torchrun always assumes the machines reach each other directly
}
# accelerate flags that Nekoya's settings already carry
_SETTING_FLAGS = {
    "--num_processes": "num_processes", "--num_machines": "num_machines", "--multi_gpu": "multi_gpu",
    "--gpu_ids": "gpu_ids", "--main_process_port": "main_process_port", "--mixed_precision": "mixed_precision",
    "--num_cpu_threads_per_process": "num_cpu_threads_per_process", "--dynamo_backend": "dynamo_backend",
}


class LaunchArgsError(NekoyaError, ValueError):
    """A GPU id list or extra launch argument that cannot be used (the message names it and the fix)."""


def parse_gpu_ids(text: str) -> tuple[int, ...]:
    """``"0,1"`` -> (0, 1); empty -> (). Raises LaunchArgsError naming the bad entry."""
    ids: list[int] = []
    for part in (p.strip() for p in str(text or "").split(",")):
        if not part:
            continue
        if not part.isdigit():
            raise LaunchArgsError(f"GPU IDs: {part!r} is not a GPU number; write them as 0,1")
        if int(part) in ids:
            raise LaunchArgsError(f"GPU IDs: GPU {part} is listed twice")
        ids.append(int(part))
    return tuple(ids)


def torchrun_extra_args(text: str) -> list[str]:
    """Extra accelerate launch arguments as torchrun arguments; LaunchArgsError for one that has no torchrun
    meaning or duplicates a setting."""
    try:
        tokens = shlex.split(str(text or ""))
    except ValueError as exc:
        raise LaunchArgsError(f"Extra accelerate launch arguments: {exc}") from None
    out: list[str] = []
    i = 0
    while i < len(tokens):
        flag, _, inline = tokens[i].partition("=")
        flag = "--" + flag.lstrip("-").replace("-", "_")
        if flag in _SETTING_FLAGS:
            raise LaunchArgsError(f"Extra accelerate launch arguments: {tokens[i]} is the setting "
                                  f"{_SETTING_FLAGS[flag]}; set it there and remove it here")
        if flag not in _MAPPED:
            known = ", ".join(sorted(_MAPPED))
            raise LaunchArgsError(f"Extra accelerate launch arguments: {tokens[i]} has no torchrun equivalent "
                                  f"(Nekoya starts processes with torchrun); these are understood: {known}")
        target, takes_value = _MAPPED[flag]
        value = inline
        if takes_value and not inline:
            if i + 1 >= len(tokens):
                raise LaunchArgsError(f"Extra accelerate launch arguments: {tokens[i]} needs a value")
            i += 1
            value = tokens[i]
        if target:
            out += [target, value] if takes_value else [target]
        i += 1
    return out


@dataclass(frozen=True)
class GroupLayout:
    """How a run's processes are spread: ``processes`` in all, ``per_machine`` on each of ``machines``."""

    processes: int
    machines: int
    gpu_ids: tuple[int, ...]
    port: int

    @classmethod
    def of(cls, settings: Any) -> "GroupLayout":
        return cls(max(1, int(settings.num_processes or 1)), max(1, int(settings.num_machines or 1)),
                   parse_gpu_ids(settings.gpu_ids), int(settings.main_process_port or 0) or DEFAULT_PORT)

    @property
    def per_machine(self) -> int:
        return max(1, self.processes // self.machines)

    @property
    def several(self) -> bool:
        return self.processes > 1


def global_batch(batch_size: int, processes: int) -> int:
    return max(1, int(batch_size)) * max(1, int(processes))


def in_worker() -> bool:
    """Whether this process is one of a torchrun group (torchrun sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def local_torchrun_command(layout: GroupLayout, config_path: str, extra: list[str]) -> list[str]:
    """The command that starts the group on this machine: ``python -m torch.distributed.run`` (torchrun) with
    ``python -m trainer train --config C`` in each process."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
            str(layout.processes), "--master_addr", "127.0.0.1", "--master_port", str(layout.port), *extra,
            "-m", "trainer", "train", "--config", config_path]


def node_command(layout: GroupLayout, config_path: str, host: str = "HOST") -> str:
    """What each machine of a several-machine run runs (README and the check say it)."""
    return (f"torchrun --nnodes {layout.machines} --nproc_per_node {layout.per_machine} --node_rank R "
            f"--rdzv-backend c10d --rdzv-endpoint {host}:{layout.port} -m trainer train --config {config_path}")


def starts_group(settings: Any) -> bool:
    """Whether ``train`` starts a torchrun group (several processes asked for, and not already in one)."""
    return GroupLayout.of(settings).several and not in_worker()
