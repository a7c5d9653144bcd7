"""Where a training step's time goes: Nekoya's trainer against a bare LoRA loop on the same model.

    python bench/profile_train.py --mode time      # wall and CPU seconds per step (median after warm-up)
    python bench/profile_train.py --mode cprofile  # Python-level profile of the step loop (top functions)
    python bench/profile_train.py --mode torch     # torch.profiler operator table for a few steps
    python bench/profile_train.py --mode bare      # the floor: a bare LoRA loop, same model/targets/optimizer
    python bench/profile_train.py --mode bare --lean  # the same loop on Nekoya's own models (trainer/models)
    python bench/profile_train.py --mode startup   # where the time before the first step goes (phase by phase)

Uses the model and image folder that ``bench/train_speed.py --size tiny`` builds (run that once first),
the same settings as its child (batch 1, AdamW, dim/alpha 8, constant LR, seed 1, latents cached).
A diagnostic tool for humans, not a test: nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("time", "cprofile", "torch", "bare", "startup"), default="time")
    p.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nekoya-bench"))
    p.add_argument("--top", type=int, default=25, help="rows of the profile tables")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the trainer's default is 2)")
    p.add_argument("--lean", action="store_true",
                   help="bare mode on Nekoya's own models (trainer/models) with fused AdamW: the trainer's floor")
    return p


def bench_paths(args: argparse.Namespace) -> tuple[Path, Path, int]:
    resolution = 64 if args.size == "tiny" else 512
    work = Path(args.workdir)
    model, images = work / f"model-{args.size}", work / f"images-{resolution}"
    if not (model / "model_index.json").exists() or not images.exists():
        raise SystemExit(f"run `python bench/train_speed.py --size {args.size}` once first (builds {model})")
    return model, images, resolution


def bench_settings(model: Path, images: Path, resolution: int, steps: int, threads: int = 2):
    """The settings bench/train_speed.py's child uses, latents cached."""
    from trainer.settings import TrainingSettings

    return TrainingSettings(
        model_list="custom", pretrained_model_name_or_path=str(model), train_data_dir=str(images),
        output_dir=tempfile.mkdtemp(prefix="bench-prof-"), output_name="bench",
        max_resolution=f"{resolution},{resolution}", train_batch_size=1, max_train_steps=steps, epoch=1000,
        save_every_n_epochs=0, optimizer="AdamW", cache_latents=True, gradient_checkpointing=False,
        mixed_precision="no", network_dim=8, network_alpha=8, lr_scheduler="constant", lr_warmup=0, seed=1,
        enable_bucket=False, caption_extension=".txt", num_cpu_threads_per_process=threads,
    )


class StepClock:
    """Event sink: wall and process-CPU time at every optimizer step; optional hooks at warm-up/end."""

    def __init__(self, on_warm=None, on_end=None, total=0) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.on_warm, self.on_end, self.total = on_warm, on_end, total

    def __call__(self, event) -> None:
        from trainer.events import Step

        if not isinstance(event, Step):
            return
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if len(self.wall) == WARMUP_STEPS and self.on_warm:
            self.on_warm()
        if len(self.wall) == self.total and self.on_end:
            self.on_end()

    def summary(self) -> dict:
        return {"steps": len(self.wall), "s_per_step": _median_gap(self.wall), "cpu_s_per_step": _median_gap(self.cpu)}


def _median_gap(stamps: list[float]) -> float | None:
    gaps = [b - a for a, b in zip(stamps[WARMUP_STEPS - 1:], stamps[WARMUP_STEPS:])]
    return round(statistics.median(gaps), 4) if gaps else None


# the setup steps trainer.loop calls by these names (trainer.run_setup's functions, the outputs method)
SETUP_PHASES = ("plan_run", "load_model", "build_lora", "build_stepper", "prepare_inputs", "_prepare_outputs")


def run_startup(args: argparse.Namespace) -> dict:
    """Seconds spent in each setup phase of trainer.loop, then in the first step; stops after it."""
    from process_clock import process_start_time

    started = process_start_time()
    from trainer import loop
    from trainer.control import Control

    phases: dict[str, float] = {"imports": round(time.time() - started, 2)}
    for name in SETUP_PHASES:  # private names: a diagnostic, so skip any that no longer exist
        owner = loop._Run if name.startswith("_") else loop
        original = getattr(owner, name, None)
        if original is not None:
            setattr(owner, name, _timed(original, name, phases))
    model, images, resolution = bench_paths(args)
    control = Control()
    first: list[float] = []
    setup_done = [0.0]

    def sink(event) -> None:
        from trainer.events import Started, Step

        if isinstance(event, Started):
            setup_done[0] = time.time()
        if isinstance(event, Step) and not first:
            first.append(time.time())
            control.request_stop()

    loop.train(bench_settings(model, images, resolution, 2, args.threads), sink, control)
    phases["first_step"] = round(first[0] - setup_done[0], 2) if first else None
    return {"mode": "startup", "size": args.size, "threads": args.threads, "phases_s": phases,
            "time_to_first_step_s": round(first[0] - started, 2) if first else None}


def _timed(function, name: str, phases: dict):
    def wrapper(*a, **kw):
        t = time.time()
        try:
            return function(*a, **kw)
        finally:
            phases[name.strip("_")] = round(time.time() - t, 2)

    return wrapper


def run_trainer(args: argparse.Namespace) -> dict:
    from trainer.loop import train

    model, images, resolution = bench_paths(args)
    settings = bench_settings(model, images, resolution, args.steps, args.threads)
    profiler = cProfile.Profile() if args.mode == "cprofile" else None
    torch_prof = _torch_profiler() if args.mode == "torch" else None
    warm = profiler.enable if profiler else (torch_prof.__enter__ if torch_prof else None)
    end = profiler.disable if profiler else ((lambda: torch_prof.__exit__(None, None, None)) if torch_prof else None)
    clock = StepClock(warm, end, args.steps)
    result = train(settings, clock)
    out = {"mode": args.mode, "size": args.size, "threads": args.threads, "status": result.status, **clock.summary()}
    if profiler:
        out["profile"] = _pstats_text(profiler, args.top)
    if torch_prof:
        out["profile"] = torch_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    return out


def _torch_profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], record_shapes=False)


def _pstats_text(profiler: cProfile.Profile, top: int) -> str:
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


# -- the floor: a bare LoRA loop ------------------------------------------------------------------
def run_bare(args: argparse.Namespace) -> dict:
    """Same model, LoRA targets, rank, optimizer, clipping and cached latents; nothing else."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    model, images, resolution = bench_paths(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    if args.lean:
        unet, vae, text_encoder, tokenizer = _lean_models(model)
    else:
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").requires_grad_(False).eval()
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae").requires_grad_(False).eval()
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").requires_grad_(False).eval()
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        unet.set_attn_processor(unet.attn_processors)  # diffusers' default SDPA processors
    params = _inject_lora(unet, ("Transformer2DModel",)) + _inject_lora(text_encoder, ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"))
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=args.lean)
    schedule = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    latents, tokens = _cached_inputs(images, resolution, vae, tokenizer)
    clock = StepClock(total=args.steps)
    for step in range(args.steps):
        i = step % len(latents)
        cond = text_encoder(tokens[i])[0]
        noise = torch.randn_like(latents[i])
        t = torch.randint(0, 1000, (1,))
        noisy = schedule.add_noise(latents[i], noise, t)
        pred = unet(noisy, t, cond)
        loss = torch.nn.functional.mse_loss(pred if args.lean else pred.sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.wall.append(time.perf_counter())
        clock.cpu.append(time.process_time())
    return {"mode": "bare", "lean": args.lean, "size": args.size, "threads": args.threads,
            "lora_params": sum(p.numel() for p in params), **clock.summary()}


def _lean_models(model: Path):
    import torch

    from trainer.models.clip_tokenizer import CLIPTokenizer
    from trainer.models.components import load_folder_component

    unet, vae, text_encoder = (load_folder_component(model, name, torch.float32).requires_grad_(False).eval()
                               for name in ("unet", "vae", "text_encoder"))
    return unet, vae, text_encoder, CLIPTokenizer.from_pretrained(model / "tokenizer")


def _inject_lora(root, classes: tuple[str, ...], rank: int = 8, alpha: float = 8.0) -> list:
    """sd-scripts-style: wrap every Linear / 1x1 Conv2d inside modules of ``classes``; returns the LoRA params."""
    import torch

    params = []
    for module in list(root.modules()):
        if type(module).__name__ not in classes:
            continue
        for child in list(module.modules()):
            is_linear = isinstance(child, torch.nn.Linear)
            if not (is_linear or (isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1))):
                continue
            n_in, n_out = (child.in_features, child.out_features) if is_linear else (child.in_channels, child.out_channels)
            down = torch.nn.Linear(n_in, rank, bias=False) if is_linear else torch.nn.Conv2d(n_in, rank, 1, bias=False)
            up = torch.nn.Linear(rank, n_out, bias=False) if is_linear else torch.nn.Conv2d(rank, n_out, 1, bias=False)
            torch.nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            torch.nn.init.zeros_(up.weight)
            original, scale = child.forward, alpha / rank
            child.forward = lambda x, o=original, d=down, u=up, s=scale: o(x) + u(d(x)) * s
            params += [down.weight, up.weight]
    return params


def _cached_inputs(images: Path, resolution: int, vae, tokenizer):
    import numpy as np
    import torch
    from PIL import Image

    latents, tokens = [], []
    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    with torch.no_grad():
        for path in files:
            pixels = np.asarray(Image.open(path).convert("RGB").resize((resolution, resolution)), dtype=np.float32)
            pixels = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None]
            latents.append(vae.encode(pixels).latent_dist.sample() * 0.18215)
            caption = path.with_suffix(".txt").read_text().strip()
            tokens.append(tokenizer([caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids)
    return latents, tokens


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runner = {"bare": run_bare, "startup": run_startup}.get(args.mode, run_trainer)
    out = runner(args)
    profile = out.pop("profile", None)
    out["load_avg"] = os.getloadavg()[0]
    print(json.dumps(out))
    if profile:
        print(profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
