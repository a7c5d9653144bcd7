"""Training speed benchmark: seconds per step, time to first step, peak memory.

    python bench/train_speed.py --size tiny
    python bench/train_speed.py --size sd15 --steps 4 --resolution 512 --gradient-checkpointing \
        --optimizer AdamW8bit --cache-latents
    python bench/train_speed.py --size sdxl --gradient-checkpointing --optimizer AdamW8bit --unet-only  # GPU
    python bench/train_speed.py --size sd15 --processes 2  # a torchrun group against one process: scaling

Builds a random-initialised model of that size from configs (``sdxl`` is the real SDXL base
architecture, ~14 GB of fp32 files: for GPU machines; ``sd15`` is the real
SD 1.5 architecture, ``sd21`` the real SD 2.1 768 px v-prediction one) and a generated image folder once (cached under --workdir), then
runs the real trainer entry point in a fresh child process and prints one JSON line.
``time_to_first_step_s`` is measured from the child's process start, i.e. from the
command a user types to the first finished optimizer step, model already on disk.
Latents are cached when a batch first uses them, so ``s_per_step`` leaves out the time spent
encoding during those steps (sd-scripts encodes before its first step; ``latent_encode_s`` says
how much was left out). This is a benchmark, not a test: nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Size(NamedTuple):
    family: str  # trainer.devtools.synthetic family of the random model
    resolution: int  # default square resolution
    steps: int  # default optimizer steps


SIZES = {"tiny": Size("sd1", 64, 30), "sd15": Size("sd1", 512, 4), "sd21": Size("sd2v", 768, 4),
         "sdxl": Size("sdxl", 1024, 4)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="tiny")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30 tiny, 4 sd15/sdxl)")
    p.add_argument("--resolution", type=int, default=None,
                   help="square training resolution (default 64 tiny, 512 sd15, 1024 sdxl)")
    p.add_argument("--unet-only", action="store_true",
                   help="train the U-Net only (text_encoder_lr 0): text-encoder outputs are cached, as in "
                        "kohya's low-VRAM SDXL settings (sdxl_cache_text_encoder_outputs)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--optimizer", default="AdamW")
    p.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=True,
                   help="cache latents before training (the settings' default; --no-cache-latents to encode every step)")
    p.add_argument("--cache-to-disk", action="store_true",
                   help="cache_latents_to_disk: latents kept next to the images, so a later run (see --again) reads them")
    p.add_argument("--mixed-precision", default=None, help="no/fp16/bf16 (default: bf16 on CUDA, no on CPU)")
    p.add_argument("--network-dim", type=int, default=8)
    p.add_argument("--processes", type=int, default=1,
                   help="train as a group of N processes (one per GPU; gloo on a CPU), and one process for comparison: "
                        "prints samples per second of both and the scaling efficiency")
    p.add_argument("--threads", type=int, default=2, help="num_cpu_threads_per_process")
    p.add_argument("--lora-type", default="Standard", help="kohya_ss's LoRA type, e.g. 'LyCORIS/LoHa'")
    p.add_argument("--conv-dim", type=int, default=0, help="conv rank of LoCon-style types (0: none)")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "xformers", "none"),
                   help="CrossAttention (kohya's xformers setting): sdpa (default), xformers, or none (plain attention)")
    p.add_argument("--again", action="store_true",
                   help="then start a second run in the same process, as a second Start in the GUI does (libraries "
                        "imported, files in the page cache), and add its time to first step from the call "
                        "(peak_rss_mb then covers both runs)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nekoya-bench"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def paths(args: argparse.Namespace) -> tuple[Path, Path]:
    work = Path(args.workdir)
    return work / f"model-{args.size}", work / f"images-{args.resolution}"


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """Model folder and image folder, built once per size/resolution and reused."""
    from trainer.devtools.images import make_image_folder
    from trainer.devtools.synthetic import build_tiny_pipeline

    model, images = paths(args)
    if not (model / "model_index.json").exists():
        build_tiny_pipeline(model, family=SIZES[args.size].family, seed=0, size=args.size)
    if not images.exists():
        side = args.resolution
        make_image_folder(images, concepts={"10_bench cat": 8}, sizes=[(side, side)], captions=True, seed=0)
    return model, images


def bench_settings(args: argparse.Namespace, model: Path, images: Path, cuda: bool):
    """The run every benchmark here times or measures: the issue's settings for this size and options."""
    from trainer.settings import TrainingSettings

    out = Path(tempfile.mkdtemp(prefix="bench-out-"))
    family = SIZES[args.size].family
    return TrainingSettings(
        model_list="custom", pretrained_model_name_or_path=str(model), train_data_dir=str(images),
        output_dir=str(out), output_name="bench", max_resolution=f"{args.resolution},{args.resolution}",
        train_batch_size=args.batch, max_train_steps=args.steps, epoch=1000, save_every_n_epochs=0,
        optimizer=args.optimizer, cache_latents=args.cache_latents or args.cache_to_disk,
        cache_latents_to_disk=args.cache_to_disk, gradient_checkpointing=args.gradient_checkpointing,
        mixed_precision=args.mixed_precision or ("bf16" if cuda else "no"), network_dim=args.network_dim,
        network_alpha=args.network_dim, LoRA_type=args.lora_type, conv_dim=args.conv_dim, conv_alpha=args.conv_dim or 1,
        lr_scheduler="constant", lr_warmup=0, seed=1, enable_bucket=False,
        caption_extension=".txt", sdxl=family == "sdxl", v2=family.startswith("sd2"),
        v_parameterization=family == "sd2v", xformers=args.attention, num_processes=args.processes,
        num_cpu_threads_per_process=args.threads, main_process_port=_free_port(),
        **({"text_encoder_lr": 0.0, "sdxl_cache_text_encoder_outputs": True} if args.unet_only else {}),
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(args: argparse.Namespace, model: Path, images: Path) -> dict:
    import time

    from process_clock import process_start_time

    started = process_start_time()
    from trainer.events import Step
    from trainer.loop import train

    import torch

    cuda = torch.cuda.is_available()
    settings = bench_settings(args, model, images, cuda)
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    walls: list[float] = []  # when each Step event arrived here

    def sink(event) -> None:
        if isinstance(event, Step):  # a group's steps arrive through the launcher: rank 0's clock times them
            walls.append(time.time())
            stamps.append(walls[-1] if args.processes == 1 else started + event.elapsed_s)
            cpu_stamps.append(time.process_time())

    encodes = _time_latent_encoding()
    train(settings, sink)
    gaps, cpu_gaps = _median_gaps(stamps, encodes.wall), _median_gaps(cpu_stamps, encodes.cpu)
    again = None
    if args.again:
        first_run_steps = len(stamps)
        called = time.time()
        train(settings.model_copy(update={"output_dir": tempfile.mkdtemp(prefix="bench-out-")}), sink)
        again = round(walls[first_run_steps] - called, 2)
        del walls[first_run_steps:]
        del stamps[first_run_steps:]
    result = {
        "size": args.size, "lora_type": args.lora_type, "conv_dim": args.conv_dim,
        "resolution": args.resolution, "batch": args.batch, "optimizer": args.optimizer,
        "unet_only": args.unet_only,
        "gradient_checkpointing": args.gradient_checkpointing, "cache_latents": args.cache_latents,
        "steps": len(stamps), "s_per_step": round(gaps, 4) if gaps else None,
        "latent_encode_s": round(sum(end - start for start, end in encodes.wall), 2),
        # process CPU seconds per step (all threads): less sensitive than wall time to a shared machine
        "cpu_s_per_step": round(cpu_gaps, 4) if cpu_gaps else None,
        "time_to_first_step_s": round(walls[0] - started, 2) if walls else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1), "device": "cuda" if cuda else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if cuda:
        result["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["peak_vram_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name()
    if again is not None:
        result["again_time_to_first_step_s"] = again
    if result["s_per_step"]:
        result["it_per_s"] = round(1 / result["s_per_step"], 3)
        result["processes"] = args.processes
        result["samples_per_s"] = round(args.batch * args.processes / result["s_per_step"], 3)
    return result


class _EncodeClock:
    """(start, end) of every latent-encoding call, on the wall clock and the process CPU clock."""

    def __init__(self) -> None:
        self.wall: list[tuple[float, float]] = []
        self.cpu: list[tuple[float, float]] = []


def _time_latent_encoding() -> _EncodeClock:
    """Latents are encoded when a batch first uses them (epoch 1), so some steps include a VAE encode that
    sd-scripts does before its first step. Seconds per step leave that time out (it is in the time to
    first step and the total, not in the per-step cost)."""
    import time

    from trainer.data.latent_cache import LatentCache

    clock, encode_group = _EncodeClock(), LatentCache._encode_group

    def timed(self, group):
        wall, cpu = time.time(), time.process_time()
        try:
            return encode_group(self, group)
        finally:
            clock.wall.append((wall, time.time()))
            clock.cpu.append((cpu, time.process_time()))

    LatentCache._encode_group = timed
    return clock


def _median_gaps(stamps: list[float], excluded: list[tuple[float, float]] = ()) -> float | None:
    """Median gap between steps after the first two (warm-up), less the ``excluded`` intervals inside it;
    all gaps when there are fewer than four."""
    def gap(a: float, b: float) -> float:
        return b - a - sum(max(0.0, min(b, end) - max(a, start)) for start, end in excluded)

    gaps = sorted(gap(a, b) for a, b in zip(stamps[2:], stamps[3:])) or sorted(gap(a, b) for a, b in zip(stamps, stamps[1:]))
    return gaps[len(gaps) // 2] if gaps else None


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.steps = args.steps or SIZES[args.size].steps
    args.resolution = args.resolution or SIZES[args.size].resolution
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:  # the model is on disk already: measure only what a user's run pays
        print(json.dumps(child(args, *paths(args))))
        return 0
    prepare(args)
    argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    runs = []
    for processes in ([1, args.processes] if args.processes > 1 else [1]):
        proc = subprocess.run([sys.executable, __file__, *argv, "--processes", str(processes), "--child"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            return proc.returncode
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if len(runs) == 2 and runs[0].get("samples_per_s") and runs[1].get("samples_per_s"):
        one, group = runs
        print(json.dumps({**group, "one_process_samples_per_s": one["samples_per_s"],
                          "scaling_efficiency": round(group["samples_per_s"] / (args.processes * one["samples_per_s"]), 3)}))
    else:
        print(json.dumps(runs[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
