"""Checks of a run of several processes (kohya_ss's Accelerate launch settings), before anything starts.

Processes against the GPUs this machine has and the GPU IDs given, the machines (Start trains on this
machine only: other machines run torchrun themselves), the port the processes meet on, NCCL, the extra
launch arguments torchrun understands, and on a CPU how the cores are shared.
"""
from __future__ import annotations

import os
import socket
import sys

from trainer.distributed.rules import (GroupLayout, LaunchArgsError, global_batch, in_worker, node_command,
                                       parse_gpu_ids, torchrun_extra_args)
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem


@preflight_check("training.processes")
def check_processes(ctx: CheckContext):
    s = ctx.settings
    try:
        parse_gpu_ids(s.gpu_ids)
        torchrun_extra_args(s.extra_accelerate_launch_args)
    except LaunchArgsError as exc:
        field = "gpu_ids" if str(exc).startswith("GPU IDs") else "extra_accelerate_launch_args"
        yield Problem("error", field, str(exc))
        return
    layout = GroupLayout.of(s)
    if not layout.several:
        if layout.gpu_ids and ctx.device.kind == "cuda":
            yield from _devices(ctx, layout)
        elif layout.gpu_ids not in ((), (0,)):
            yield Problem("note", "gpu_ids", "no NVIDIA GPU on this machine: GPU IDs is not used")
        if s.multi_gpu:
            yield Problem("warning", "num_processes", "Multi GPU is ticked but Number of processes is 1: the run "
                          "trains on one GPU", fix="set Number of processes to the number of GPUs to train on")
        return
    if layout.processes % layout.machines:
        yield Problem("error", "num_processes", f"Number of processes ({layout.processes}) is the processes of all "
                      f"{layout.machines} machines together and must divide evenly among them",
                      fix=f"set it to a multiple of {layout.machines}")
        return
    yield Problem("note", "num_processes", f"{layout.processes} processes train together: each step trains "
                  f"{global_batch(s.train_batch_size, layout.processes)} samples ({s.train_batch_size} per process), "
                  "their gradients averaged; only the first process writes files, logs and samples")
    if layout.machines > 1 and not in_worker():
        yield Problem("error", "num_machines", f"Start trains on this machine only; a run on {layout.machines} "
                      "machines is started on each machine with torchrun",
                      fix=f"run on every machine (R = 0 on this one, 1, 2 … on the others): {node_command(layout, 'C')} "
                          "with C the config saved from this form; or set Number of machines to 1")
        return
    if not in_worker():  # a worker's GPUs are the ones torchrun gave it, its port the group's
        yield from _devices(ctx, layout)
        yield from _port(layout.port)


def _devices(ctx: CheckContext, layout: GroupLayout):
    device = ctx.device
    if device.kind != "cuda" and layout.several:
        cores = os.cpu_count() or 1
        threads = layout.per_machine * max(1, int(ctx.settings.num_cpu_threads_per_process or 1))
        severity = "warning" if threads > cores else "note"
        yield Problem(severity, "num_processes", f"no NVIDIA GPU: the {layout.per_machine} processes train on the CPU "
                      f"and exchange gradients over gloo, {threads} threads in all on {cores} cores",
                      fix="lower Number of CPU threads per core so that processes × threads ≤ cores"
                      if severity == "warning" else "")
        return
    if device.kind != "cuda":
        return
    ids = layout.gpu_ids
    missing = [i for i in ids if i >= device.gpu_count]
    if missing:
        yield Problem("error", "gpu_ids", f"GPU IDs names GPU {missing[0]}, but this machine has {device.gpu_count} "
                      f"(0 to {device.gpu_count - 1})", fix="list GPUs that exist, e.g. " +
                      ",".join(map(str, range(min(layout.per_machine, device.gpu_count)))))
    elif layout.several and ids and len(ids) != layout.per_machine:
        yield Problem("error", "gpu_ids", f"GPU IDs lists {len(ids)} GPUs but {layout.per_machine} processes run on "
                      "this machine: one GPU each", fix="list as many GPUs as processes, or empty GPU IDs")
    elif not ids and layout.per_machine > device.gpu_count:
        yield Problem("error", "num_processes", f"{layout.per_machine} processes need a GPU each, but this machine has "
                      f"{device.gpu_count}", fix=f"set Number of processes to {device.gpu_count} or fewer")
    if not _nccl_available():
        yield Problem("warning", "multi_gpu", "NCCL is not available in this PyTorch build (Windows builds have none): "
                      "the GPUs exchange gradients over gloo, which is slower", fix="train on Linux for NCCL")


def _nccl_available() -> bool:
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.distributed.is_available() and torch.distributed.is_nccl_available())
    return not sys.platform.startswith("win")


def _port(port: int):
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind(("127.0.0.1", port))
    except OSError:
        yield Problem("error", "main_process_port", f"port {port} is in use on this machine (another run, or another "
                      "program), so the processes cannot meet on it", fix=f"set Main process port to a free port, "
                      f"e.g. {port + 1}")
    finally:
        probe.close()
