"""TensorBoard logs of a run (when ``logging_dir`` is set), with sd-scripts' tag names.

Tags: ``loss/current`` and ``loss/average`` per step, ``loss/epoch`` per epoch,
``lr/<group>`` per step (``lr/unet``, ``lr/textencoder``). Each run writes to its own
``<logging_dir>/<output_name><YYYYmmddHHMMSS>`` folder, as sd-scripts' log prefix.
"""
from __future__ import annotations

import os
import time


class TensorBoardLog:
    def __init__(self, logging_dir: str, output_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = os.path.join(logging_dir, output_name + time.strftime("%Y%m%d%H%M%S"))
        self.writer = SummaryWriter(self.folder)

    def step(self, step: int, loss: float, avg_loss: float, lrs: dict[str, float]) -> None:
        self.writer.add_scalar("loss/current", loss, step)
        self.writer.add_scalar("loss/average", avg_loss, step)
        for name, lr in lrs.items():
            self.writer.add_scalar(f"lr/{name}", lr, step)

    def epoch(self, epoch: int, avg_loss: float) -> None:
        self.writer.add_scalar("loss/epoch", avg_loss, epoch)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class NoLog:
    """Stands in when no logging_dir is set."""

    folder = None

    def step(self, *args, **kwargs) -> None:
        pass

    def epoch(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def open_log(logging_dir: str, output_name: str):
    return TensorBoardLog(logging_dir, output_name) if logging_dir else NoLog()
