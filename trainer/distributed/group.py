"""A worker's place in its torchrun group: rank, device, and the few collectives the run needs.

Outside a torchrun group ``join_group`` returns the one-process group, whose collectives do nothing, so the
loop reads the same either way. NCCL carries the collectives between NVIDIA GPUs, gloo between CPUs.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass

import torch

from trainer.distributed.rules import in_worker, parse_gpu_ids
from trainer.events import Memory

# A paused group waits in its next collective until rank 0 resumes: the limit is how long a pause may last.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=24)
MEMORY_FIELDS = ("rss_mb", "allocated_mb", "reserved_mb", "total_mb", "peak_allocated_mb")


@dataclass(frozen=True)
class Group:
    rank: int = 0
    processes: int = 1
    local_rank: int = 0
    backend: str = ""  # "nccl" or "gloo"; "" for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.processes > 1

    def device(self, default: torch.device, gpu_ids: str = "") -> torch.device:
        """This process's GPU: its local rank's in a group (torchrun's CUDA_VISIBLE_DEVICES holds the GPU IDs),
        else the first of GPU IDs."""
        if default.type != "cuda":
            return default
        index = self.local_rank if self.several else (parse_gpu_ids(gpu_ids) or (0,))[0]
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    def where(self, device: torch.device) -> str:
        """Where the run trains, as the live view says it: "cuda:0", or "cuda × 4 processes (nccl)"."""
        return f"{device.type} × {self.processes} processes ({self.backend})" if self.several else str(device)

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def mean(self, value: torch.Tensor) -> float:
        """The mean over the processes of a scalar each computed (a NaN anywhere is a NaN everywhere)."""
        if not self.several:
            return value.item()
        total = value.detach().float().reshape(1).to(self._collective_device())
        torch.distributed.all_reduce(total)
        return total.item() / self.processes

    def gather(self, row: list[float]) -> list[list[float]]:
        """Every process's ``row`` (all the same length), by rank."""
        if not self.several:
            return [list(row)]
        mine = torch.tensor(row, dtype=torch.float64, device=self._collective_device())
        rows = [torch.empty_like(mine) for _ in range(self.processes)]
        torch.distributed.all_gather(rows, mine)
        return [r.tolist() for r in rows]

    def prediction(self, family, network: torch.nn.Module, device: torch.device):
        """``family.predict``; in a group through DistributedDataParallel (``trainer.distributed.ddp``)."""
        from trainer.distributed.ddp import group_prediction

        return group_prediction(self, family, network, device)

    def gradient_sync(self, prediction, sync: bool):
        """Around a batch's forward and backward: DDP averages gradients only when ``sync`` (the batch the
        optimizer steps after), so accumulated batches cost no communication."""
        no_sync = getattr(prediction, "no_sync", None)
        return contextlib.nullcontext() if sync or no_sync is None else no_sync()

    def leave(self) -> None:
        if self.several and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def join_group() -> Group:
    """Join the torchrun group this process was started in (or the one-process group)."""
    if not in_worker() or int(os.environ["WORLD_SIZE"]) <= 1:
        return Group()
    rank, processes = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_nccl = torch.cuda.is_available() and torch.distributed.is_nccl_available()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_nccl else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return Group(rank, processes, local_rank, backend)


def memory_row(memory: Memory) -> list[float]:
    return [math.nan if getattr(memory, name) is None else float(getattr(memory, name)) for name in MEMORY_FIELDS]


def memory_of(row: list[float], device: str) -> Memory:
    values = {name: (None if math.isnan(v) else v) for name, v in zip(MEMORY_FIELDS, row)}
    return Memory(device, **values)
