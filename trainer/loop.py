"""``train(settings, sink, control)``: the one training entry point (GUI, CLI, benchmark).

The preflight check makes the run plan (``trainer.run_plan``); the run carries it out, reading
top to bottom: model, network, optimizer, data, outputs (built by ``trainer.run_setup``), then
the step loop and the saves. The step body follows diffusers' order: encode, noise, timesteps,
predict, target, loss, backward, step, log, save. Progress leaves only as events.
"""
from __future__ import annotations

import math
import os
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from trainer import events as ev
from trainer.control import Control
from trainer.device_lease import TRAINING, take as take_device
from trainer.distributed.group import Group, join_group
from trainer.distributed.launcher import starts_group, train_group
from trainer.loss import LossWeighting, family_sample_weights, huber_c, per_sample_loss, training_loss
from trainer.model_libraries import import_model_libraries
from trainer.network.build import learning_rates
from trainer.network.run_metadata import RunMetadata
from trainer.noise import NoiseConfig
from trainer.noise_sampling import NoiseSamplerFactory, RandomNoise, row_generator
from trainer.optim.precision import Precision, pick_device
from trainer.problems import is_user_error
from trainer.run_errors import TrainingError, failure_problem
from trainer.run_plan import RunPlan
from trainer.run_resume import continue_run
from trainer.run_setup import (build_lora, build_stepper, load_model, load_resume, open_outputs, pick_seed, plan_run,
                               prepare_inputs, tell_plan)
from trainer.run_rescue import keep_after_failure
from trainer.safety import BadImagePolicy, NanGuard
from trainer.saving import epoch_state_name, final_state_name, step_state_name
from trainer.state import ProgressMeter, memory_snapshot, rng_state
from trainer.state_folder import Position, save_state

__all__ = ["train", "TrainResult", "TrainingError"]
SNAPSHOT_EVERY_STEPS = 10  # a CPU copy of finite weights this often, for a NaN stop to fall back to


@dataclass(frozen=True)
class TrainResult:
    status: str  # "finished", "stopped" or "failed"
    step: int = 0
    files: tuple[str, ...] = ()
    error: str | None = None
    field: str | None = None  # the setting to fix, when one is to blame
    last_loss: float | None = None
    kept: Any = None  # saving.KeptWeights held in memory when a full disk kept them from being written


def train(settings: Any, sink: ev.EventSink = ev.ignore, control: Control | None = None, *,
          plan: RunPlan | None = None, noise: NoiseSamplerFactory = RandomNoise) -> TrainResult:
    """Train a LoRA as the settings (or ``plan``, a full check's ``run_plan``) say, reporting through ``sink``;
    stop between steps on request. ``noise``: the noise sampler (tests: ``FixedNoise``). Several processes:
    a torchrun group (``trainer.distributed``)."""
    if starts_group(settings):
        return train_group(settings, sink, control or Control())
    run = _Run(settings, sink, control or Control(), noise)
    try:
        run.setup(plan)
        return run.train()
    except Exception as exc:  # every failure ends as one Error event and a "failed" result
        problem = failure_problem(exc, run.settings)
        if not is_user_error(exc):
            sink(ev.Log("".join(traceback.format_exception(exc)), "warning"))
        run.save_what_exists()
        sink(ev.Error.of(problem))
        return TrainResult("failed", run.step, tuple(run.files), problem.message, problem.field,
                           kept=run.control.kept_weights)
    finally:
        run.close()


class _Run:
    def __init__(self, settings: Any, sink: ev.EventSink, control: Control, noise: NoiseSamplerFactory) -> None:
        self.settings, self.sink, self.control, self.noise_factory = settings, sink, control, noise
        self.step, self.epoch, self.batches_done = 0, 1, 0
        self.start_epoch, self.start_batch = 1, 0  # where the step loop begins (later when resuming)
        self.files: list[str] = []
        self.device, self.group = pick_device(), Group()
        self._release_device = lambda: None  # the device's lease, taken in setup()
        # made by setup(), in this order (the parts: trainer.run_setup)
        self.plan: RunPlan | None = None
        self.precision: Precision | None = None
        self.metadata: RunMetadata | None = None
        self.resume = self.generator = self.family = self.schedule = self.weighting = self.noise_config = None
        self.noise = self.network = self.stepper = self.image_policy = self.nan_guard = self.predict = None
        self.latents = self.dataset = self.prompts = self.outputs = self.log_writer = self.samples = self.meter = None
        self.seed, self.lrs, self.train_te = 0, {}, False

    def log(self, message: str, level: str = "info") -> None:
        self.sink(ev.Log(message, level))

    # -- setup: plan, model, network, optimizer, data, outputs -------------------------------------
    def setup(self, plan: RunPlan | None) -> None:
        self.plan = plan = plan or plan_run(self.settings, self.log)
        self.settings = s = plan.settings
        tell_plan(plan, self.log)
        self.group = join_group()  # torchrun's group, or this process alone
        self.device = self.group.device(self.device, s.gpu_ids)
        self._release_device = take_device(self.device, TRAINING, wait_log=self.log,
                                           cpu_threads=s.num_cpu_threads_per_process).release
        self.precision = Precision.of(plan.precision, self.device)
        self.log(self.precision.describe())
        self.metadata = RunMetadata(plan)
        self.resume = load_resume(s.resume, plan.steps)
        self.seed = pick_seed(s, self.resume, self.log)
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        import_model_libraries()
        self.family = load_model(s, self.precision, self.log)
        self.schedule = self.family.noise_schedule(self.device)
        self.weighting = LossWeighting.from_settings(s, self.family.v_prediction)
        self.noise_config = NoiseConfig.from_settings(s)
        self.noise = self.noise_factory(self.noise_config, self.schedule, self.seed)
        self.lrs = learning_rates(s)
        self.network, self.train_te = build_lora(plan, self.family, self.lrs, self.precision, self.seed, self.log)
        self.predict = self.group.prediction(self.family, self.network, self.device)  # DDP in a group
        self.stepper = build_stepper(plan, self.network, self.lrs, self.precision, self.log)
        self.image_policy, self.nan_guard = BadImagePolicy(s.bad_image_policy), NanGuard(s.nan_loss_policy, settings=s)
        self.latents, self.dataset, self.prompts = prepare_inputs(plan, self.family, self.train_te, self.precision,
                                                                  self.seed, self.log, self._bad_image, self.group)
        self.metadata.describe(self.family.version_metadata(), self.lrs, self.seed)
        self.outputs, self.log_writer, self.samples = open_outputs(self.plan, self.family, self.network, self.metadata,
                                                                   self.precision, self.sink, self._saved, self.log,
                                                                   self.group)
        if self.resume is not None:
            self.step, self.start_epoch, self.start_batch = continue_run(
                self.resume, self.network, self.stepper, self.generator, s.resume, self.log, self.group.processes)

    def _bad_image(self, error) -> None:
        decision = self.image_policy.handle(error.path, error)
        if decision.action == "stop":
            raise TrainingError(decision.message, "bad_image_policy")
        self.log(decision.message, "warning")

    # -- the step loop ----------------------------------------------------------------------------
    def train(self) -> TrainResult:
        plan, start_epoch, start_batch = self.plan.steps, self.start_epoch, self.start_batch
        self.meter = ProgressMeter(plan.total_steps, self.step, window=plan.steps_per_epoch)
        self.sink(ev.Started(plan.total_steps, plan.epochs, plan.steps_per_epoch, plan.summary(), self.group.where(self.device),
                             self.step))
        self.samples.before_training(self.step)
        for epoch in range(start_epoch, plan.epochs + 1):
            self.epoch = epoch
            self.meter.new_epoch()
            interrupted = self._run_epoch(epoch, start_batch if epoch == start_epoch else 0)
            if not interrupted or self.step >= plan.total_steps:
                self._end_epoch(epoch, complete=self.batches_done >= len(self.dataset))
            if self.step >= plan.total_steps:
                break
            if self.control.stop_requested:
                return self._stop()
        return self._finish()

    def _run_epoch(self, epoch: int, first_batch: int) -> bool:
        """Train the epoch's batches from ``first_batch``; True when it ended early (steps done or stop)."""
        accum = max(1, int(self.settings.gradient_accumulation_steps))
        self.batches_done = first_batch
        losses: list[float] = []
        vae_guard = self.latents.vae_guard()
        for batch in self.dataset.iter_epoch(epoch, first_batch):
            self.batches_done += 1
            stepping = not (self.batches_done % accum and self.batches_done < len(self.dataset))
            with self.group.gradient_sync(self.predict, stepping):  # a group averages the stepping batch's only
                losses.append(self._train_step(batch))
            if not stepping:
                continue  # accumulate more gradients before stepping
            with vae_guard:
                self._optimizer_step(sum(losses) / len(losses))
            losses = []
            if self.step >= self.plan.steps.total_steps or self.control.between_steps(self):  # a pause waits here
                return True
        self.latents.finish()  # every image was used once: all latents are cached
        return False

    def _train_step(self, batch) -> float:
        s, schedule = self.settings, self.schedule
        self.network.set_batch_size(len(batch))  # rank dropout masks per sample
        self.network.next_dropout_draws()
        with self.precision.autocast():
            latents = self._latents(batch)
            cond = self.prompts(batch.captions, self.train_te)
            draw = self.noise(latents, batch.row_keys)  # per sample: the same draws however batches are split
            noisy = schedule.add_noise(latents, draw.input_noise, draw.timesteps)
            if s.gradient_checkpointing:
                noisy.requires_grad_(True)  # checkpointed blocks need an input that requires grad
            pred = self.predict(noisy, draw.timesteps, cond, batch)
        target = schedule.target(latents, draw.noise, draw.timesteps)
        snr = schedule.snr(draw.timesteps)
        c = huber_c(s.loss_type, s.huber_schedule, s.huber_c, s.huber_scale, snr, draw.timesteps)
        per_sample = per_sample_loss(pred, target, s.loss_type, c, getattr(batch, "masks", None))
        weights = family_sample_weights(batch.loss_weights.to(self.device), schedule, draw.timesteps)
        loss = training_loss(per_sample, weights, snr, self.weighting)
        self.stepper.backward(loss)
        value = self.group.mean(loss.detach())  # after backward (the group's mean: a NaN anywhere stops all)
        return value if math.isfinite(value) else self._bad_loss(value)

    def _latents(self, batch) -> torch.Tensor:
        if batch.latents is not None:
            latents = batch.latents.to(self.device)
        else:
            latents = self.family.encode_images(batch.images, [row_generator(k) for k in batch.row_keys])
        return self.family.scale_latents(latents).to(self.precision.base_dtype)

    def _bad_loss(self, value: float) -> float:
        decision = self.nan_guard.check(value, self.step + 1)
        if decision.action == "stop":
            raise TrainingError(decision.message, "nan_loss_policy")
        self.log(decision.message, "warning")
        self.stepper.optimizer.zero_grad(set_to_none=True)  # drop this update
        return float("nan")

    def _optimizer_step(self, loss: float) -> None:
        if not math.isfinite(loss):
            return  # a skipped NaN step
        self.stepper.step()
        if self.settings.scale_weight_norms:
            self.network.apply_max_norm(float(self.settings.scale_weight_norms))
        self.step += 1
        encoding_s, encoding_left_s = self.latents.encoding_time()
        self.meter.record(loss, excluded_s=encoding_s)
        lrs = self.stepper.group_lrs()
        self.sink(ev.Step(
            step=self.step, total_steps=self.plan.steps.total_steps, epoch=self.epoch, total_epochs=self.plan.steps.epochs,
            loss=loss, avg_loss=self.meter.avg_loss, lr=next(iter(lrs.values()), 0.0), lrs=lrs,
            it_per_s=self.meter.it_per_s(), elapsed_s=self.meter.elapsed(), eta_s=self.meter.eta(self.step, encoding_left_s),
            memory=memory_snapshot(self.device), ranks=self.control.rank_memory,
        ))
        self.log_writer.step(self.step, loss, self.meter.avg_loss, lrs)
        if self.outputs.step_due(self.step, self.plan.steps.total_steps) or self.control.take_save_request():
            self.outputs.save("step", self.step, self.epoch)
            if self.settings.save_state:
                self._save_state(self.outputs.path(step_state_name(self.settings.output_name, self.step)))
        elif self.step % SNAPSHOT_EVERY_STEPS == 0:
            self.outputs.snapshot(self.step, self.epoch)
        self.samples.after_step(self.step, self.epoch, requested=self.control.take_sample_request())

    def _end_epoch(self, epoch: int, complete: bool = True) -> None:
        """Also run when the step cap cuts the epoch short (not ``complete``): the position then stays in it."""
        self.sink(ev.EpochEnd(epoch, self.plan.steps.epochs, self.meter.epoch_loss))
        self.log_writer.epoch(epoch, self.meter.epoch_loss)
        if self.outputs.epoch_due(epoch, self.plan.steps.epochs):
            self.outputs.save("epoch", self.step, epoch)
            if self.settings.save_state:
                self._save_state(self.outputs.path(epoch_state_name(self.settings.output_name, epoch)),
                                 next_epoch=complete)
                self.outputs.drop_old_epoch_state(epoch)
        self.samples.after_epoch(epoch, self.step, requested=self.control.take_sample_request())
        if complete:  # the position a stop (or a resume with more steps) goes on from
            self.batches_done, self.epoch = 0, epoch + 1

    def _finish(self) -> TrainResult:
        s = self.settings
        self.outputs.save("final", self.step, min(self.epoch, self.plan.steps.epochs))
        if s.save_state or s.save_state_on_train_end:
            self._save_state(self.outputs.path(final_state_name(s.output_name)))
        self.sink(ev.Finished(self.step, tuple(self.files)))
        return TrainResult("finished", self.step, tuple(self.files), last_loss=self.meter.last_loss)

    def _stop(self) -> TrainResult:
        s = self.settings
        self.outputs.save("stopped", self.step, self.epoch)
        if s.save_state or s.save_state_on_train_end:
            self._save_state(self.outputs.path(step_state_name(s.output_name, self.step)))
        self.sink(ev.Stopped(self.step, tuple(self.files)))
        return TrainResult("stopped", self.step, tuple(self.files))

    def save_what_exists(self) -> None:
        """After a failure mid-run: keep the trained steps (``trainer.run_rescue``). Never raises."""
        if self.step and self.outputs is not None and self.group.is_main:
            kind = "final" if self.step >= self.plan.steps.total_steps else "stopped"
            keep_after_failure(self.outputs, self.step, self.epoch, kind, SNAPSHOT_EVERY_STEPS, self.control, self.sink)

    def _save_state(self, folder: str, next_epoch: bool = False) -> None:
        if not self.group.is_main:  # rank 0 writes a group's state
            return
        epoch, batches = (self.epoch + 1, 0) if next_epoch else (self.epoch, self.batches_done)
        save_state(folder, self.network.lora_state_dict(torch.float32), self.stepper.state_dict(),
                   rng_state(self.generator, self.network.dropout_generator),
                   Position(self.step, epoch, batches, self.seed, self.group.processes))
        self._saved(folder, "state", self.step, self.epoch)

    def _saved(self, path: str, kind: str, step: int, epoch: int) -> None:
        if path not in self.files:
            self.files.append(path)
        self.files[:] = [f for f in self.files if os.path.exists(f)]
        self.sink(ev.Saved(path, kind, step, epoch))

    def close(self) -> None:
        if self.log_writer is not None:
            self.log_writer.close()
        self._release_device()
        if self.metadata is not None:
            self.metadata.close()
