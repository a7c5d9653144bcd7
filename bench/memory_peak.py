"""Peak tensor memory of a training run, on any device: the VRAM figure without a GPU.

    python bench/memory_peak.py --size sd15 --gradient-checkpointing --optimizer AdamW8bit
    python bench/memory_peak.py --size sdxl --gradient-checkpointing --optimizer AdamW8bit --unet-only

Runs the real trainer entry point (same settings as ``bench/train_speed.py``, bf16 by default as on a
GPU) under a dispatch mode that adds up the bytes of every tensor storage the run creates and
subtracts them when the storage is freed. The peak is what ``torch.cuda.max_memory_allocated()``
reports for the same run on a GPU, less the kernels' scratch buffers (cuBLAS/cuDNN workspaces),
which no tensor owns; ``nvidia-smi`` adds the allocator's cache and the CUDA context (~0.5 GB) on
top. bf16 runs on any CPU here, even without bf16 instructions (slowly): the tensor sizes are
what matter. The CPU's autocast keeps GroupNorm and LayerNorm in bf16, CUDA's runs them in fp32
(their inputs and outputs are then fp32 activations); by default the run follows CUDA's rule
(``--cpu-norms`` keeps the CPU's). Prints one JSON line with the peak of the steps and of the VAE
encodes apart, the memory when training starts (weights, LoRA, optimizer) and the preflight
estimate for the same settings on a GPU.
A benchmark, not a test: nothing here asserts a figure.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import weakref
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402  (bench/, next to this file)

MIB = 2**20


class TensorBytes(TorchDispatchMode):
    """Live bytes of the tensor storages created under it, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = WeakIdKeyDictionary()  # storage -> weakref whose callback subtracts its bytes
        self.current = 0
        self.peak = 0
        self.phase = "step"  # what runs now: "step" or "encode" (a VAE encode of latents on first use)
        self.phase_peaks = {"step": 0, "encode": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._track(leaf.untyped_storage())
        return out

    def _track(self, storage) -> None:
        if storage in self.live:
            return
        size = storage.nbytes()
        self.live[storage] = weakref.ref(storage, lambda _, size=size: self._free(size))
        self.current += size
        self.peak = max(self.peak, self.current)
        self.phase_peaks[self.phase] = max(self.phase_peaks[self.phase], self.current)

    def restart_peaks(self) -> None:
        self.peak = self.current
        self.phase_peaks = dict.fromkeys(self.phase_peaks, self.current)

    def _free(self, size: int) -> None:
        self.current -= size

    def offload(self, module) -> None:
        """What ``module.to("cpu")`` frees on a GPU (a no-op on a CPU): its storages leave the count."""
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            storage = tensor.untyped_storage()
            if storage in self.live:
                del self.live[storage]  # its weakref goes too, so no callback subtracts it twice
                self.current -= storage.nbytes()


def _wrap(stack: contextlib.ExitStack, owner, name: str, wrapper) -> None:
    """Replace ``owner.name`` by ``wrapper(original)`` until the stack closes."""
    stack.enter_context(mock.patch.object(owner, name, wrapper(getattr(owner, name))))


def _family_classes() -> tuple[type, ...]:
    from trainer.families.sd import StableDiffusionFamily
    from trainer.families.sdxl import SDXLFamily

    return StableDiffusionFamily, SDXLFamily


def count_offloads(stack: contextlib.ExitStack, tracker: TensorBytes) -> None:
    """The trainer frees device memory by moving the text encoders (outputs cached) and the VAE (latents
    cached) to the CPU; on a CPU that moves nothing, so tell the tracker."""
    released = {"release_text_encoders": lambda family: family.text_encoders, "release_vae": lambda family: (family.vae,)}
    for cls, (name, modules) in itertools.product(_family_classes(), released.items()):
        if name in vars(cls):
            def offloading(release, _modules=modules):
                def offload(self):
                    release(self)
                    for module in _modules(self):
                        tracker.offload(module)
                return offload
            _wrap(stack, cls, name, offloading)


def count_encodes_apart(stack: contextlib.ExitStack, tracker: TensorBytes) -> None:
    """Peaks inside the families' ``encode_images`` (latents cached on first use, during epoch 1) go to
    the "encode" phase, so the step's own peak shows apart."""
    def encoding(encode):
        def encode_in_its_phase(self, *args, **kwargs):
            tracker.phase = "encode"
            try:
                return encode(self, *args, **kwargs)
            finally:
                tracker.phase = "step"
        return encode_in_its_phase

    for cls in _family_classes():
        if "encode_images" in vars(cls):
            _wrap(stack, cls, "encode_images", encoding)


def follow_cuda_autocast_norms(stack: contextlib.ExitStack) -> None:
    """CUDA's autocast runs group_norm and layer_norm in fp32 (inputs cast up, fp32 out); the CPU's
    leaves them in bf16. Do as CUDA does, so the saved activations have the GPU's sizes."""
    import torch.nn.functional as F

    def up(value):
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def in_fp32(norm):
        def norm_like_cuda(x, *args, **kwargs):
            if not torch.is_autocast_enabled("cpu") or x.dtype == torch.float32:
                return norm(x, *args, **kwargs)
            return norm(x.float(), *map(up, args), **{k: up(v) for k, v in kwargs.items()})
        return norm_like_cuda

    _wrap(stack, F, "group_norm", in_fp32)
    _wrap(stack, F, "layer_norm", in_fp32)


def main(argv: list[str] | None = None) -> int:
    parser = train_speed.build_parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.set_defaults(steps=2, mixed_precision="bf16")
    parser.add_argument("--cpu-norms", action="store_true",
                        help="keep the CPU autocast's bf16 norms (default: fp32 norms, as CUDA's autocast)")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or train_speed.SIZES[args.size].resolution
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from trainer.events import Started
    from trainer.loop import train
    from trainer.preflight import device
    from trainer.preflight.device import GIB, DeviceInfo
    from trainer.families import spec_for_settings
    from trainer.preflight.memory import estimate_memory

    model, images = train_speed.prepare(args)
    settings = train_speed.bench_settings(args, model, images, cuda=torch.cuda.is_available())
    tracker = TensorBytes()
    at_start: list[int] = []

    def sink(event) -> None:
        if isinstance(event, Started):  # models, LoRA and optimizer are built; no step has run
            at_start.append(tracker.current)
            # checkpoints load and convert on the CPU, then the models move to the device: on a GPU the
            # load-time peak (fp32 and bf16 copies of a model at once) is in RAM, so VRAM counts from here
            tracker.restart_peaks()

    with contextlib.ExitStack() as stack:
        # run the GPU's dtypes on any CPU
        stack.enter_context(mock.patch.object(device, "cpu_has_native_bf16", lambda: True))
        count_offloads(stack, tracker)
        count_encodes_apart(stack, tracker)
        if not args.cpu_norms:
            follow_cuda_autocast_norms(stack)
        with tracker:
            result = train(settings, sink)
    if result.status != "finished":
        sys.stderr.write(f"the run did not finish: {result.error}\n")
        return 1
    estimate = estimate_memory(settings, spec_for_settings(settings), DeviceInfo("cuda", "GPU", 80 * GIB, 80 * GIB, "bench"))
    print(json.dumps({
        "size": args.size, "resolution": args.resolution, "batch": args.batch, "optimizer": args.optimizer,
        "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
        "unet_only": args.unet_only, "norms": "cpu" if args.cpu_norms else "cuda", "steps": result.step,
        "peak_tensor_mb": round(tracker.peak / MIB, 1),  # from the start of training
        "peak_step_mb": round(tracker.phase_peaks["step"] / MIB, 1),
        "peak_encode_mb": round(tracker.phase_peaks["encode"] / MIB, 1),
        "at_start_mb": round(at_start[0] / MIB, 1) if at_start else None,
        "preflight_estimate_mb": round(estimate.total_bytes / MIB, 1),
        "preflight_parts_mb": {name: round(size / MIB, 1) for name, size in estimate.parts.items()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
