"""``train(settings, sink, control)``: the one training entry point (GUI, CLI, benchmark).

Reads top to bottom: data, model, network, optimizer, inputs, step loop, save.
The step body follows diffusers' order: encode, noise, timesteps, predict,
target, loss, backward, step, log, save. Progress leaves only as events.
"""
from __future__ import annotations

import concurrent.futures
import os
import random
import time
import traceback
import uuid
from dataclasses import dataclass, replace
from typing import Any

import torch

from trainer import events as ev
from trainer.control import Control
from trainer.model_libraries import import_model_libraries
from trainer.problems import NekoyaError, Problem, is_user_error, problem_of
from trainer.safety import is_disk_full
from trainer.saving import NonFiniteWeights, epoch_state_name, final_state_name, step_state_name
from trainer.state import memory_snapshot

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


class TrainingError(NekoyaError):
    """Training cannot start or go on; the message says why, ``field`` which setting and ``fix`` what to do."""

    def __init__(self, message: str, field: str | None = None, fix: str | None = None) -> None:
        super().__init__(message)
        self.field, self.fix = field, fix


def train(settings: Any, sink: ev.EventSink = ev.ignore, control: Control | None = None, *,
          debug_fixed_noise: bool = False) -> TrainResult:
    """Train a LoRA as the settings say, reporting through ``sink``; stop between steps on request.

    ``debug_fixed_noise`` is a testing hook, not a user setting: every step reuses one
    noise draw and one set of timesteps per batch shape, so an overfit run's loss falls
    reliably. Never use it for real training.
    """
    run = _Run(settings, sink, control or Control(), debug_fixed_noise)
    try:
        run.clean_up_after_crashes()
        run.setup()
        return run.train()
    except Exception as exc:  # every failure ends as one Error event and a "failed" result
        problem = _describe(exc, settings)
        if not is_user_error(exc):
            sink(ev.Log("".join(traceback.format_exception(exc)), "warning"))
        run.save_what_exists()
        sink(ev.Error.of(problem))
        return TrainResult("failed", run.step, tuple(run.files), problem.message, problem.field,
                           kept=run.control.kept_weights)
    finally:
        run.close()


class _Run:
    def __init__(self, settings: Any, sink: ev.EventSink, control: Control, debug_fixed_noise: bool) -> None:
        self.settings, self.sink, self.control = settings, sink, control
        self.debug_fixed_noise = debug_fixed_noise
        self.step = 0
        self.start_epoch, self.start_batch = 1, 0  # where the step loop begins (later when resuming)
        self.files: list[str] = []
        self._encoding_seen = 0.0  # the latent cache's encoding seconds at the last step
        self.log_writer = None
        self.outputs = None  # set once the run can write files
        self._threads_before = 0
        self._hash_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nekoya-hash")

    def log(self, message: str, level: str = "info") -> None:
        self.sink(ev.Log(message, level))

    def clean_up_after_crashes(self) -> None:
        """Temp files and half-swapped state folders that a killed run left (before preflight reads them)."""
        from trainer.state_folder import recover_interrupted_saves

        s = self.settings
        resume = os.path.normpath(os.path.expanduser(s.resume.strip())) if s.resume.strip() else ""
        for line in recover_interrupted_saves(s.output_dir or ".", os.path.dirname(resume)):
            self.log(line)

    # -- setup: data, model, network, optimizer, inputs ------------------------------------------
    def setup(self) -> None:
        self._check_settings()
        import_model_libraries()
        self._load_model()
        self._build_network()
        self._build_optimizer()
        self._prepare_inputs()
        self._prepare_outputs()
        self._prepare_samples()
        if self.resume is not None:
            self._restore(self.resume)

    def _check_settings(self) -> None:
        """Device, precision, seed, step plan and optimizer/network choices: all before any weights load."""
        from trainer.data.plan import plan_steps
        from trainer.network.network import NetworkSpec
        from trainer.optim import plan_optimizer, plan_scheduler
        from trainer.optim.precision import pick_device, resolve_precision

        s = self.settings = self._preflight(self.settings)
        self.started_at = time.time()
        self.device = pick_device()
        if self.device.type == "cuda":  # TF32 matmuls: free speed on Ampere+, no visible quality loss
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.device.type == "cpu" and s.num_cpu_threads_per_process:
            # what accelerate's --num_cpu_threads_per_process does (OMP threads); restored in close()
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(int(s.num_cpu_threads_per_process))
        self.precision = resolve_precision(s, self.device)
        for note in self.precision.notes:
            if note not in self._preflight_said:  # the CPU precision note comes from the same rule
                self.log(note, "warning")
        self.log(self.precision.describe())
        self.resume = self._load_resume()
        self.seed = self._pick_seed()
        self.plan = plan_steps(s)
        if not self.plan.ok:
            raise TrainingError("; ".join(self.plan.errors) or "no training steps", "train_data_dir")
        # the plan's warnings were logged with the preflight report (its dataset.plan check), once
        NetworkSpec.from_settings(s)  # raises on an unsupported LoRA type
        self.opt_plan = plan_optimizer(s, self.device.type)
        self.sched_plan = plan_scheduler(s, self.plan.total_steps, self.opt_plan.scheduler_override)
        for note in self.opt_plan.notes + self.sched_plan.notes:
            self.log(note, "warning")
        self._notes_shown = len(self.opt_plan.notes)
        self.model_hashes = self._hash_pool.submit(_model_hashes, s.pretrained_model_name_or_path)

    def _preflight(self, settings: Any) -> Any:
        """The full preflight check (the same as `python -m trainer check`): refuse before any
        weights load, and apply the adjustments it announces (e.g. Adafactor's warmup)."""
        from trainer.preflight import check

        report = check(settings, deep=True)
        for problem in report.warnings + report.notes:
            self.log(problem.format(), "warning" if problem.severity == "warning" else "info")
        self._preflight_said = {problem.message for problem in report.warnings + report.notes}
        if not report.ok:
            first = report.errors[0]
            lines = "\n".join(p.format() for p in report.errors)
            raise TrainingError(f"The preflight check found {len(report.errors)} problem(s):\n{lines}", first.field, first.fix or None)
        return report.adjusted(settings)

    def _load_resume(self):
        if not self.settings.resume:
            return None
        from trainer.state_folder import load_state

        try:
            return load_state(self.settings.resume)
        except (OSError, KeyError, ValueError) as exc:
            raise TrainingError(f"cannot resume from {self.settings.resume}: {exc}", "resume") from exc

    def _pick_seed(self) -> int:
        seed = (self.resume.position.seed if self.resume else 0) or int(self.settings.seed or 0)
        if not seed:
            seed = random.SystemRandom().randint(1, 2**31 - 1)
            self.log(f"seed 0 means random: this run uses seed {seed}")
        random.seed(seed)
        torch.manual_seed(seed)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        return seed

    def _load_model(self) -> None:
        from trainer.families import create_family
        from trainer.loss import LossWeighting
        from trainer.noise import NoiseConfig

        s = self.settings
        self.family = create_family(s)
        self.family.load(s, self.precision.base_dtype, self.device, self.log)
        self.family.set_attention(s.xformers, self.log)
        self.schedule = self.family.noise_schedule(self.device)
        self.noise_config = NoiseConfig.from_settings(s)
        self.weighting = LossWeighting.from_settings(s, self.family.v_prediction)
        self._fixed_noise: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _build_network(self) -> None:
        from trainer.network.build import build_network, learning_rates
        from trainer.network.targets import Role

        s = self.settings
        self.lrs = learning_rates(s)
        self.network = build_network(s, self.family, self.lrs, self.log)
        self.train_te = bool(self.network.lora_modules(Role.TEXT_ENCODER))
        self.network.to(self.device, dtype=self.precision.network_dtype)
        self.network.apply_to()
        self.network.train()
        if s.gradient_checkpointing:
            self.family.enable_gradient_checkpointing(self.train_te)
        self._compile_unet()

    def _compile_unet(self) -> None:
        """torch.compile the UNet in place (after the LoRA hooks are in), when a Dynamo backend is chosen."""
        backend = self.settings.dynamo_backend
        if backend in ("", "no"):
            return
        if backend == "cudagraphs" and self.device.type != "cuda":
            self.log("Dynamo backend cudagraphs needs an NVIDIA GPU; the UNet runs without torch.compile", "warning")
            return
        self.family.unet.compile(backend=backend)
        self.log(f"UNet compiled with torch.compile (backend {backend}); the first steps are slower while it compiles")

    def _build_optimizer(self) -> None:
        from trainer.optim import create_scheduler
        from trainer.optim.stepper import OptimizerStepper

        s = self.settings
        optimizer = self.opt_plan.create(self.network.param_groups(self.lrs))
        for note in self.opt_plan.notes[self._notes_shown:]:  # notes added while creating (one lr for all groups)
            self.log(note, "warning")
        scheduler = create_scheduler(self.sched_plan, optimizer)
        self.stepper = OptimizerStepper(optimizer, scheduler, self.network.parameters(), s.gradient_accumulation_steps,
                                        s.max_grad_norm, self.precision.make_scaler())

    def _prepare_inputs(self) -> None:
        """Dataset (with latents cached when possible) and the caption encoder."""
        from trainer.data.dataset import DatasetConfig, TrainingDataset
        from trainer.families.prompts import PromptEncoder
        from trainer.safety import BadImagePolicy, NanGuard

        s = self.settings
        self.image_policy = BadImagePolicy(s.bad_image_policy)
        self.nan_guard = NanGuard(s.nan_loss_policy, settings=s)
        config = replace(DatasetConfig.from_settings(s, skip_bad_images=s.bad_image_policy == "skip"), seed=self.seed)
        cache = self._latent_cache() if (s.cache_latents or s.cache_latents_to_disk) else None
        self.dataset = TrainingDataset(self.plan.entries, config, latents=cache, on_bad_image=self._bad_image)
        cache_outputs = not self.train_te and config.captions.is_static
        self.prompts = PromptEncoder(self.family, s.clip_skip, s.max_token_length, cache_outputs, self.precision.autocast)
        if cache_outputs:
            count = self.prompts.precompute(e.item.caption for e in self.plan.entries)
            self.family.release_text_encoders()
            self.log(f"text encoder outputs cached for {count} captions (text encoder not trained)")

    def _latent_cache(self):
        """The latent cache, encoding each image when a batch first needs it: the first step comes after its
        own batch is encoded, not after the whole dataset (``_finish_latent_cache`` frees the VAE later)."""
        from trainer.data.latent_cache import CacheSpec, LatentCache, latent_caching_blockers

        s = self.settings
        blockers = latent_caching_blockers(s)
        if blockers:
            self.log("latents are not cached: " + "; ".join(blockers), "warning")
            return None
        spec = CacheSpec(
            encode=self.family.encode_images, seed=self.seed,
            to_disk=bool(s.cache_latents_to_disk), flip=bool(s.flip_aug), batch_size=max(1, int(s.vae_batch_size or 1)),
            suffix=self.family.cache_suffix, fingerprint=self.family.fingerprint(),
        )
        cache = LatentCache(spec)
        shown = [-1]

        def progress(done: int, total: int) -> None:  # a Log line per 10% for big datasets (from any thread)
            tenth = done * 10 // max(1, total)
            if tenth > shown[0] and total >= 20:
                shown[0] = tenth
                self.log(f"caching latents: {done}/{total}")

        report = cache.prepare(self.plan.entries, progress)
        if report.pending:
            self.log(f"latents are encoded as each image is first used ({report.pending} to encode, {report.reused} "
                     "read from disk), so the steps of the first epoch are slower")
        else:  # everything was on disk
            self._finish_latent_cache(cache)
        return cache

    def _finish_latent_cache(self, cache) -> None:
        """Once: encode what is still missing (after a resume the first epoch skipped some batches; normally
        nothing), say the totals and free the VAE, which only sampling needs from then on."""
        if cache is None or cache.finished:
            return
        report = cache.finish()
        self.log(f"latents cached: {report.encoded} encoded, {report.reused} read from disk")
        self.family.release_vae()

    def _bad_image(self, error) -> None:
        decision = self.image_policy.handle(error.path, error)
        if decision.action == "stop":
            raise TrainingError(decision.message, "bad_image_policy")
        self.log(decision.message, "warning")

    def _prepare_outputs(self) -> None:
        from trainer.network.build import network_args
        from trainer.network.metadata import dataset_facts, training_metadata
        from trainer.network.network import NetworkSpec
        from trainer.network.targets import Role
        from trainer.saving import RunOutputs
        from trainer.tb_log import open_log

        s = self.settings
        self.version = self.family.version_metadata()
        run_facts = {
            "session_id": uuid.uuid4().int % 2**31, "started_at": self.started_at, "num_epochs": self.plan.epochs,
            "max_train_steps": self.plan.total_steps, "lr_warmup_steps": self.sched_plan.warmup_steps,
            "optimizer": self.opt_plan.description(),
            "unet_lr": self.lrs[Role.UNET], "text_encoder_lr": self.lrs[Role.TEXT_ENCODER],
            "network_args": network_args(s, NetworkSpec.from_settings(s)),
        }
        self.base_metadata = training_metadata(s, self.version, dataset_facts(self.plan), run_facts)
        self.outputs = RunOutputs(s, self.network.lora_state_dict, self._metadata, self._saved)
        os.makedirs(self.outputs.folder, exist_ok=True)
        self._save_settings_copy()
        self.log_writer = open_log(s.logging_dir, s.output_name)

    def _prepare_samples(self) -> None:
        """Sample images (every N epochs/steps, at first, on request): ``trainer.inference``."""
        from trainer.inference.training_samples import TrainingSamples

        self.samples = TrainingSamples(self.settings, self.family, self.network, self.device, self.precision.autocast,
                                       self.sink)

    def _save_settings_copy(self) -> None:
        """``<output_name>_<YYYYmmdd-HHMMSS>.json`` beside the outputs, as kohya_ss does."""
        from trainer.settings import save_settings

        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started_at))
        save_settings(self.settings, os.path.join(self.outputs.folder, f"{self.settings.output_name}_{stamp}.json"))

    def _restore(self, state) -> None:
        from trainer.state import restore_rng

        self.network.load_lora_state_dict(state.lora_tensors)
        self.stepper.load_state_dict(state.stepper_state)
        restore_rng(state.rng, self.generator)
        self.step = state.position.step
        self.start_epoch, self.start_batch = state.position.epoch, state.position.batches_done
        self.log(f"resumed from {self.settings.resume} at step {self.step} (epoch {self.start_epoch}, "
                 f"batch {self.start_batch})")

    # -- the step loop ----------------------------------------------------------------------------
    def train(self) -> TrainResult:
        from trainer.state import ProgressMeter

        plan, start_epoch, start_batch = self.plan, self.start_epoch, self.start_batch
        self.meter = ProgressMeter(plan.total_steps, self.step, window=plan.steps_per_epoch)
        self.sink(ev.Started(plan.total_steps, plan.epochs, plan.steps_per_epoch, plan.summary(), str(self.device),
                             self.step))
        self.samples.before_training(self.step)
        for epoch in range(start_epoch, plan.epochs + 1):
            self.epoch = epoch
            self.meter.new_epoch()
            interrupted = self._run_epoch(epoch, start_batch if epoch == start_epoch else 0)
            if not interrupted or self.step >= plan.total_steps:
                self._end_epoch(epoch)
            if self.step >= plan.total_steps:
                break
            if self.control.stop_requested:
                return self._stop()
        return self._finish()

    def _run_epoch(self, epoch: int, first_batch: int) -> bool:
        """Train the epoch's batches from ``first_batch``; True when it ended early (steps done or stop)."""
        from contextlib import nullcontext

        accum = max(1, int(self.settings.gradient_accumulation_steps))
        self.batches_done = first_batch
        losses: list[float] = []
        cache = self.dataset.latents
        # a data worker may encode latents with the VAE: not while a step's sampling uses it too
        vae_guard = cache.exclusive() if cache is not None else nullcontext()
        for batch in self.dataset.iter_epoch(epoch, first_batch):
            losses.append(self._train_step(batch))
            self.batches_done += 1
            if self.batches_done % accum and self.batches_done < len(self.dataset):
                continue  # accumulate more gradients before stepping
            with vae_guard:
                self._optimizer_step(sum(losses) / len(losses))
            losses = []
            if self.step >= self.plan.total_steps or self.control.stop_requested:
                return True
        self._finish_latent_cache(cache)  # every image was used once: all latents are cached
        return False

    def _train_step(self, batch) -> float:
        s, family, schedule = self.settings, self.family, self.schedule
        from trainer.loss import huber_c, per_sample_loss, training_loss
        from trainer.noise import noisy_latents

        self.network.set_batch_size(len(batch))  # rank dropout masks per sample
        with self.precision.autocast():
            latents = self._latents(batch)
            cond = self.prompts(batch.captions, self.train_te)
            noise, timesteps = self._noise_and_timesteps(latents)
            noisy = noisy_latents(schedule, latents, noise, timesteps, self.noise_config.ip_noise_gamma, self.generator)
            if s.gradient_checkpointing:
                noisy.requires_grad_(True)  # checkpointed blocks need an input that requires grad
            pred = family.predict(noisy, timesteps, cond, batch)
        target = schedule.target(latents, noise, timesteps)
        snr = schedule.snr(timesteps)
        c = huber_c(s.loss_type, s.huber_schedule, s.huber_c, s.huber_scale, snr, timesteps)
        per_sample = per_sample_loss(pred, target, s.loss_type, c)
        loss = training_loss(per_sample, batch.loss_weights.to(self.device), snr, self.weighting)
        self.stepper.backward(loss)
        value = loss.detach().item()  # after backward, so the device is busy while Python waits
        return value if _finite(value) else self._bad_loss(value)

    def _latents(self, batch) -> torch.Tensor:
        if batch.latents is not None:
            latents = batch.latents.to(self.device)
        else:
            latents = self.family.encode_images(batch.images, self.generator)
        return self.family.scale_latents(latents).to(self.precision.base_dtype)

    def _noise_and_timesteps(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from trainer.noise import sample_noise, sample_timesteps

        cfg = self.noise_config
        if self.debug_fixed_noise:  # testing hook: one draw per batch shape, reused every step
            key = tuple(latents.shape)
            if key not in self._fixed_noise:
                g = torch.Generator(device=self.device).manual_seed(self.seed)
                self._fixed_noise[key] = (sample_noise(latents, cfg, g),
                                          sample_timesteps(latents.shape[0], cfg.min_timestep, cfg.max_timestep, g, self.device))
            return self._fixed_noise[key]
        noise = sample_noise(latents, cfg, self.generator)
        return noise, sample_timesteps(latents.shape[0], cfg.min_timestep, cfg.max_timestep, self.generator, self.device)

    def _latent_encoding(self) -> tuple[float, float]:
        """(seconds spent encoding latents since the last step, estimated seconds still to encode): epoch 1's
        steps encode images on first use; the speed and ETA shown should not count that twice."""
        cache = self.dataset.latents
        if cache is None:
            return 0.0, 0.0
        report = cache.report
        since, self._encoding_seen = report.seconds - self._encoding_seen, report.seconds
        return since, report.seconds_left()

    def _bad_loss(self, value: float) -> float:
        decision = self.nan_guard.check(value, self.step + 1)
        if decision.action == "stop":
            raise TrainingError(decision.message, "nan_loss_policy")
        self.log(decision.message, "warning")
        self.stepper.optimizer.zero_grad(set_to_none=True)  # drop this update
        return float("nan")

    def _optimizer_step(self, loss: float) -> None:
        if not _finite(loss):
            return  # a skipped NaN step
        self.stepper.step()
        if self.settings.scale_weight_norms:
            self.network.apply_max_norm(float(self.settings.scale_weight_norms))
        self.step += 1
        encoding_s, encoding_left_s = self._latent_encoding()
        self.meter.record(loss, excluded_s=encoding_s)
        lrs = self.stepper.group_lrs()
        self.sink(ev.Step(
            step=self.step, total_steps=self.plan.total_steps, epoch=self.epoch, total_epochs=self.plan.epochs,
            loss=loss, avg_loss=self.meter.avg_loss, lr=next(iter(lrs.values()), 0.0), lrs=lrs,
            it_per_s=self.meter.it_per_s(), elapsed_s=self.meter.elapsed(), eta_s=self.meter.eta(self.step, encoding_left_s),
            memory=memory_snapshot(self.device),
        ))
        self.log_writer.step(self.step, loss, self.meter.avg_loss, lrs)
        if self.outputs.step_due(self.step, self.plan.total_steps) or self.control.take_save_request():
            self.outputs.save("step", self.step, self.epoch)
            if self.settings.save_state:
                self._save_state(self.outputs.path(step_state_name(self.settings.output_name, self.step)))
        elif self.step % SNAPSHOT_EVERY_STEPS == 0:
            self.outputs.snapshot(self.step, self.epoch)
        self.samples.after_step(self.step, self.epoch, requested=self.control.take_sample_request())

    def _end_epoch(self, epoch: int) -> None:
        self.sink(ev.EpochEnd(epoch, self.plan.epochs, self.meter.epoch_loss))
        self.log_writer.epoch(epoch, self.meter.epoch_loss)
        if self.outputs.epoch_due(epoch, self.plan.epochs):
            self.outputs.save("epoch", self.step, epoch)
            if self.settings.save_state:
                self._save_state(self.outputs.path(epoch_state_name(self.settings.output_name, epoch)), next_epoch=True)
                self.outputs.drop_old_epoch_state(epoch)
        self.samples.after_epoch(epoch, self.step, requested=self.control.take_sample_request())
        self.batches_done, self.epoch = 0, epoch + 1  # the position a stop right now resumes from

    # -- endings -------------------------------------------------------------------------------------
    def _finish(self) -> TrainResult:
        s = self.settings
        self.outputs.save("final", self.step, min(self.epoch, self.plan.epochs))
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
        """After a failure mid-run (NaN stop, out of memory...): keep the trained steps, finite weights only;
        when the disk is full, in memory (``Control.save_kept_to``). Never raises."""
        if self.step == 0 or self.outputs is None:
            return
        kind, weights = "final" if self.step >= self.plan.total_steps else "stopped", None
        try:
            weights = self.outputs.weights_to_keep(self.step, self.epoch, kind)
            if weights is None or weights.step != self.step:
                kept = (f"the last finite weights, of step {weights.step}, are kept" if weights else "no finite "
                        f"weights were kept (they are copied every {SNAPSHOT_EVERY_STEPS} steps and at each save)")
                self.log(f"the LoRA weights are NaN or infinite at step {self.step}, so they are not saved; {kept}",
                         "warning")
            if weights is not None and weights.saved_path is None:
                self.outputs.write(kind, weights)
        except Exception as exc:  # the failure being reported matters more than this one
            if weights is not None and is_disk_full(exc):
                self._keep_in_memory(weights, exc)
            else:
                self.log(f"could not save the LoRA after the failure: {exc}", "warning")

    def _keep_in_memory(self, weights, exc: Exception) -> None:
        from trainer.safety import disk_full_advice, free_bytes

        path = getattr(exc, "path", None) or self.outputs.path(weights.file_name)
        free = free_bytes(path)
        self.control.keep(weights)
        advice = disk_full_advice(path, free, "choose another folder with Save to…") + (
            f". The LoRA of step {weights.step} is kept in memory until then")
        self.sink(ev.DiskFull(path, free, weights.step, advice))

    def _save_state(self, folder: str, next_epoch: bool = False) -> None:
        from trainer.state import rng_state
        from trainer.state_folder import Position, save_state

        epoch, batches = (self.epoch + 1, 0) if next_epoch else (self.epoch, self.batches_done)
        save_state(folder, self.network.lora_state_dict(torch.float32), self.stepper.state_dict(),
                   rng_state(self.generator), Position(self.step, epoch, batches, self.seed))
        self._saved(folder, "state", self.step, self.epoch)

    def _saved(self, path: str, kind: str, step: int, epoch: int) -> None:
        if path not in self.files:
            self.files.append(path)
        self.files[:] = [f for f in self.files if os.path.exists(f)]
        self.sink(ev.Saved(path, kind, step, epoch))

    def _metadata(self, step: int, epoch: int) -> dict[str, str]:
        from trainer.network.metadata import modelspec_metadata, saved_metadata

        meta = dict(self.base_metadata)
        if self.model_hashes.done() or step >= self.plan.total_steps:
            meta.update(self.model_hashes.result())
        return saved_metadata(meta, modelspec_metadata(self.settings, self.version, self.started_at), step, epoch,
                              time.time())

    def close(self) -> None:
        if self.log_writer is not None:
            self.log_writer.close()
        if self._threads_before:
            torch.set_num_threads(self._threads_before)
        self._hash_pool.shutdown(wait=False, cancel_futures=True)


# -- helpers ---------------------------------------------------------------------------------------
def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def _model_hashes(path: str) -> dict[str, str]:
    from trainer.network.metadata import model_file_hashes

    try:
        return model_file_hashes(path)
    except OSError:
        return {}


def _describe(exc: Exception, settings: Any) -> Problem:
    """The failure as the Error event tells it; out of memory and NaN weights get advice for these settings."""
    from trainer.preflight.memory_advice import memory_advice
    from trainer.safety import is_out_of_memory, nan_hint

    if is_out_of_memory(exc):
        return Problem("error", "train_batch_size", "out of GPU memory", memory_advice(settings))
    problem = problem_of(exc)
    return replace(problem, fix=nan_hint(settings)) if isinstance(exc, NonFiniteWeights) else problem
