"""The metadata every save of a run carries: what the run plan decided, plus the base model's hashes.

Hashing a multi-GB checkpoint takes seconds, so it runs on a background thread from the start of
the run; saves made before it is done go without the hash keys, except the last one, which waits.
"""
from __future__ import annotations

import concurrent.futures
import time
import uuid
from typing import Any

from trainer.lora_types import KOHYA_LORA
from trainer.network.build import network_args
from trainer.network.metadata import (dataset_facts, model_file_hashes, modelspec_metadata, saved_metadata,
                                      training_metadata)
from trainer.network.targets import Role


class RunMetadata:
    def __init__(self, plan: Any) -> None:
        self.plan = plan  # trainer.run_plan.RunPlan
        self.started_at = time.time()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nekoya-hash")
        self._hashes = self._pool.submit(_model_hashes, plan.settings.pretrained_model_name_or_path)
        self._base: dict[str, str] = {}
        self._version: Any = None

    def describe(self, version: Any, lrs: dict[Role, float], seed: int | None = None) -> None:
        """The ``ss_*`` keys known once the model is loaded and the LoRA built."""
        plan, s = self.plan, self.plan.settings
        run_facts = {
            "session_id": uuid.uuid4().int % 2**31, "started_at": self.started_at, "num_epochs": plan.steps.epochs,
            "max_train_steps": plan.steps.total_steps, "lr_warmup_steps": plan.scheduler.warmup_steps,
            "mixed_precision": plan.precision.mode, "optimizer": plan.optimizer.description(),
            "unet_lr": lrs[Role.UNET], "text_encoder_lr": lrs[Role.TEXT_ENCODER],
            "network_args": network_args(s, plan.network), "network_module": _network_module(plan.network, version),
            "seed": seed,
        }
        self._version = version
        self._base = training_metadata(s, version, dataset_facts(plan.steps), run_facts)

    def __call__(self, step: int, epoch: int) -> dict[str, str]:
        """The metadata of a save at ``step``/``epoch``."""
        meta = dict(self._base)
        if self._hashes.done() or step >= self.plan.steps.total_steps:
            meta.update(self._hashes.result())
        return saved_metadata(meta, modelspec_metadata(self.plan.settings, self._version, self.started_at), step,
                              epoch, time.time())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _network_module(network: Any, version: Any) -> str:
    """kohya_ss's Standard LoRA is the family's own sd-scripts module where it has one (SD3: networks.lora_sd3)."""
    own = getattr(version, "lora_module", None)
    return own if own and network.network_module == KOHYA_LORA else network.network_module


def _model_hashes(path: str) -> dict[str, str]:
    try:
        return model_file_hashes(path)
    except OSError:
        return {}
