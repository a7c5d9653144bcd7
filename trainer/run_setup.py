"""The parts a run is built from, in the order ``trainer.loop`` builds them: the plan, the model, the LoRA
network, the optimizer and the inputs. Each function takes what it needs and returns what it made."""
from __future__ import annotations

import contextlib

import os
import random
import time
from dataclasses import replace
from typing import Any, Callable

import torch

from trainer.data.dataset import DatasetConfig, TrainingDataset
from trainer.data.latent_feed import LatentFeed
from trainer.distributed.group import Group
from trainer.families import create_family
from trainer.families.prompts import PromptEncoder
from trainer.network.build import build_network
from trainer.network.targets import Role
from trainer.optim import create_scheduler
from trainer.optim.precision import Precision
from trainer.optim.stepper import OptimizerStepper
from trainer.preflight import check
from trainer.run_errors import TrainingError
from trainer.run_plan import RunPlan
from trainer.saving import RunOutputs
from trainer.state import network_generator, restore_rng
from trainer.optim.table import optimizer_facts
from trainer.sd_scripts_state import (SD_SCRIPTS_MARK, apply_sd_scripts_optimizer, is_sd_scripts_state,
                                      load_sd_scripts_state)
from trainer.state_folder import load_state, recover_interrupted_saves

Log = Callable[..., None]


def plan_run(settings: Any, log: Log) -> RunPlan:
    """The full preflight check (the same as `python -m trainer check`), after mending what a killed run
    left (temp files, half-swapped state folders): refuse before any weights load."""
    resume = os.path.normpath(os.path.expanduser(settings.resume.strip())) if settings.resume.strip() else ""
    for line in recover_interrupted_saves(settings.output_dir or ".", os.path.dirname(resume)):
        log(line)
    report = check(settings, deep=True)
    if not report.ok:
        first = report.errors[0]
        lines = "\n".join(p.format() for p in report.errors)
        raise TrainingError(f"The preflight check found {len(report.errors)} problem(s):\n{lines}", first.field,
                            first.fix or None)
    return report.run_plan


def tell_plan(plan: RunPlan, log: Log) -> None:
    """The check's findings and the plan's own notes, each once, in the run log."""
    for problem in plan.findings:
        log(problem.format(), "warning" if problem.severity == "warning" else "info")
    for note in plan.notes:
        log(note, "warning")
    log(plan.settings_applied)


@contextlib.contextmanager
def schedule_free_eval(optimizer):
    """A Schedule-Free optimizer's averaged weights in place while saving or sampling, then training's again."""
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def load_resume(resume: str, steps_plan: Any = None) -> Any:
    """The state folder to resume from (Nekoya's, or one sd-scripts wrote), or None."""
    if not resume:
        return None
    try:
        if is_sd_scripts_state(resume):
            return load_sd_scripts_state(resume, steps_plan)
        return load_state(resume)
    except (OSError, KeyError, ValueError) as exc:
        raise TrainingError(f"cannot resume from {resume}: {exc}", "resume") from exc


def pick_seed(settings: Any, resume: Any, log: Log) -> int:
    """The resumed run's seed, else the settings' one; 0 means a random one (said in the log). Nothing global
    is seeded: the run's generators are seeded from it."""
    seed = (resume.position.seed if resume else 0) or int(settings.seed or 0)
    if not seed:
        seed = random.SystemRandom().randint(1, 2**31 - 1)
        log(f"seed 0 means random: this run uses seed {seed}")
    return seed


def resume_from(state: Any, network: Any, stepper: OptimizerStepper, generator: torch.Generator, path: str,
                log: Log) -> tuple[int, int, int]:
    """Load a saved state into the run; returns where it goes on: (step, epoch, batches done in that epoch)."""
    network.load_lora_state_dict(state.lora_tensors)
    position = state.position
    if SD_SCRIPTS_MARK in state.stepper_state:  # a folder sd-scripts wrote
        apply_sd_scripts_optimizer(stepper, state.stepper_state[SD_SCRIPTS_MARK], position.step, log)
        seed = generator.initial_seed()  # the run's seed: its random states were not readable
        generator.manual_seed(seed + position.step)
        if network.dropout_generator is not None:
            network.dropout_generator.manual_seed(seed + 1 + position.step)
    else:
        stepper.load_state_dict(state.stepper_state)
        note = restore_rng(state.rng, generator, network.dropout_generator, position.seed, position.step)
        if note:
            log(note, "warning")
    log(f"resumed from {path} at step {position.step} (epoch {position.epoch}, batch {position.batches_done})")
    return position.step, position.epoch, position.batches_done


def load_model(settings: Any, precision: Precision, log: Log) -> Any:
    family = create_family(settings)
    family.load(settings, precision.base_dtype, precision.device, log)
    family.set_attention(settings.xformers, log)
    if precision.fp8_base:
        from trainer.fp8 import store_frozen_weights_in_fp8

        saved = store_frozen_weights_in_fp8(family, precision.base_dtype)
        log(f"fp8 base: the frozen UNet and text encoders are stored in float8 ({saved / 2**30:.2f} GiB less)")
    return family


def build_lora(plan: RunPlan, family: Any, lrs: dict[Role, float], precision: Precision, seed: int,
               log: Log) -> tuple[Any, bool]:
    """The LoRA network hooked into the model, ready to train; and whether it trains the text encoder. Its
    initial weights and its dropouts draw from generators seeded from ``seed`` (no global RNG)."""
    s = plan.settings
    network = build_network(plan.network, s, family, lrs, log, torch.Generator().manual_seed(seed))
    train_te = bool(network.lora_modules(Role.TEXT_ENCODER))
    network.to(precision.device, dtype=precision.network_dtype)
    network.set_dropout_generator(network_generator(seed))
    network.apply_to()
    network.train()
    if s.gradient_checkpointing:
        family.enable_gradient_checkpointing(train_te)
    _compile_unet(s.dynamo_backend, family, precision.device, log)
    return network, train_te


def _compile_unet(backend: str, family: Any, device: torch.device, log: Log) -> None:
    """torch.compile the UNet in place (after the LoRA hooks are in), when a Dynamo backend is chosen."""
    if backend in ("", "no"):
        return
    if backend == "cudagraphs" and device.type != "cuda":
        log("Dynamo backend cudagraphs needs an NVIDIA GPU; the UNet runs without torch.compile", "warning")
        return
    family.unet.compile(backend=backend)
    log(f"UNet compiled with torch.compile (backend {backend}); the first steps are slower while it compiles")


def build_stepper(plan: RunPlan, network: Any, lrs: dict[Role, float], precision: Precision, log: Log) -> OptimizerStepper:
    s, opt_plan = plan.settings, plan.optimizer
    shown = len(opt_plan.notes)
    optimizer = opt_plan.create(network.param_groups(lrs, plan.network.plus_ratios(), plan.network.blocks,
                                                      plan.network.plus_parameters, plan.network.prefix_lrs))
    for note in opt_plan.notes[shown:]:  # notes added while creating (one lr for all groups)
        log(note, "warning")
    if optimizer_facts(s.optimizer).schedule_free:  # its eval() weights for samples and files
        network.eval_weights = lambda: schedule_free_eval(optimizer)
    return OptimizerStepper(optimizer, create_scheduler(plan.scheduler, optimizer), network.parameters(),
                            s.gradient_accumulation_steps, s.max_grad_norm, precision.make_scaler())


def prepare_inputs(plan: RunPlan, family: Any, train_te: bool, precision: Precision, seed: int, log: Log,
                   on_bad_image: Callable, group: Group) -> tuple[LatentFeed, TrainingDataset, PromptEncoder]:
    """The dataset (with latents cached when possible; this process's share of each batch in a group) and the
    caption encoder (outputs cached when the text encoder is not trained and captions never change)."""
    s, entries = plan.settings, plan.steps.entries
    config = replace(DatasetConfig.from_settings(s, skip_bad_images=s.bad_image_policy == "skip"), seed=seed,
                     processes=group.processes, rank=group.rank)
    latents = LatentFeed(s, family, entries, seed, log)
    dataset = TrainingDataset(entries, config, latents=latents.cache, on_bad_image=on_bad_image)
    cache_outputs = not train_te and config.captions.is_static
    prompts = PromptEncoder(family, s.clip_skip, s.max_token_length, cache_outputs, precision.autocast,
                            weighted=bool(s.weighted_captions))
    if cache_outputs:
        count = prompts.precompute(e.item.caption for e in entries)
        family.release_text_encoders()
        log(f"text encoder outputs cached for {count} captions (text encoder not trained)")
    return latents, dataset, prompts


def open_outputs(plan: RunPlan, family: Any, network: Any, metadata: Any, precision: Precision, sink: Any,
                 on_saved: Callable, log: Log, group: Group) -> tuple[Any, Any, Any]:
    """The run's LoRA files, logs and samples. Only rank 0 of a group writes: the other processes get
    stand-ins that write nothing."""
    from trainer.inference.training_samples import TrainingSamples
    from trainer.settings import save_settings
    from trainer.tb_log import NoLog, open_log

    s = plan.settings
    if not group.is_main:
        return _Unwritten(s, network.lora_state_dict, metadata, on_saved, log), NoLog(), _NoSamples()
    outputs = RunOutputs(s, network.lora_state_dict, metadata, on_saved, log)
    os.makedirs(outputs.folder, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(metadata.started_at))
    save_settings(s, os.path.join(outputs.folder, f"{s.output_name}_{stamp}.json"))  # as kohya_ss does
    samples = TrainingSamples(s, family, network, precision.device, precision.autocast, sink)
    return outputs, open_log(s.logging_dir, s.log_prefix or s.output_name, s), samples


class _NoSamples:
    def before_training(self, *args: Any, **kwargs: Any) -> None: ...
    def after_step(self, *args: Any, **kwargs: Any) -> None: ...
    def after_epoch(self, *args: Any, **kwargs: Any) -> None: ...


class _Unwritten(RunOutputs):
    """A group's other processes: the same saving schedule, no files."""

    def save(self, kind: str, step: int, epoch: int) -> str:
        return ""

    def snapshot(self, *args: Any, **kwargs: Any) -> None: ...
    def drop_old_epoch_state(self, *args: Any, **kwargs: Any) -> None: ...
