"""A simple, documented estimate of the memory a run needs at its peak (a training step).

    peak = frozen weights + LoRA (weights, gradients, optimizer state)
           + max(UNet activations, VAE encode, text encoders while caching) x 1.1 (allocator slack)
           + runtime

* Frozen weights: UNet + text encoders + VAE, counted in the model file's header (``model_size.py``;
  the family's nominal counts in ``families.py`` for a .ckpt or an unreadable file), at
  2 bytes (fp16/bf16 mixed precision on a GPU, bf16 on a CPU with bf16 instructions)
  or 4 bytes (no mixed precision, or a CPU where it runs in fp32); the UNet (FLUX's transformer) and
  the text encoders at 1 byte with fp8_base on a GPU. Cached latents move the VAE off the device;
  cached text-encoder outputs move the text encoders off (SDXL's setting, or any
  family whose text encoders are not trained and whose captions never change),
  after they encoded the captions once before the first step.
* LoRA: rank x (sum of in + out over its targets) parameters for the parts that
  are trained (UNet lr > 0, text encoder lr > 0), plus conv_dim x the conv sum for
  LoCon; each parameter costs weight + gradient (4 + 4 bytes, 2 + 2 with full
  fp16/bf16) + the optimizer's state (``trainer/optim/table.py``).
* Activations: the family's GiB per 512x512 sample (its figure with gradient
  checkpointing when that is on), times (width x height) / 512², times batch
  size, x1.6 in fp32. Attention is memory-efficient with every CrossAttention
  choice (SDPA, xformers, and "none", which Nekoya runs with SDPA too).
* VAE encode: 0.3 GiB per 512x512 sample in half precision (x1.6 in fp32). Latents
  are encoded on first use, so it happens during epoch 1 (a batch at a time when
  not cached), outside the UNet's step: only the larger of the two counts.

The figures are tensor peaks of real runs measured by ``bench/memory_peak.py``
(see ``families.py``); the slack and runtime parts cover what no tensor owns.
* Runtime: CUDA context and kernels' workspaces (0.8 GiB), or Python + torch on CPU (0.6 GiB).

It is meant to be right within about 30 %: enough to tell "fits" from "will run
out of memory" and to say which setting matters most.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from trainer.preflight.device import GIB, DeviceInfo
from trainer.families import FamilySpec
from trainer.preflight.memory_advice import memory_advice
from trainer.preflight.model_size import model_size, part_files_counted
from trainer.optim.table import optimizer_facts
from trainer.distributed.rules import GroupLayout
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem
from trainer.settings.tab_parameters import LOCON_TYPES

FP32_ACTIVATION_FACTOR = 1.6  # measured on SD1.5 at 512 px: 1.5x without checkpointing, 1.9x with
VAE_ENCODE_GIB_PER_SAMPLE = 0.3  # measured: 0.26 GiB at 512 px, 1.0 GiB at 1024 px
ALLOCATOR_SLACK = 1.1
RUNTIME_GIB = {"cuda": 0.8, "mps": 0.8, "cpu": 0.6}
REFERENCE_PIXELS = 512 * 512


@dataclass(frozen=True)
class MemoryEstimate:
    device: DeviceInfo
    parts: dict[str, int]  # bytes: "base model", "LoRA + optimizer", "activations or encoding", "runtime"
    precision: str  # "fp16", "bf16" or "fp32"
    trainable_params: int
    family_label: str
    notes: tuple[str, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def exceeds_device(self) -> bool:
        return self.device.total_bytes is not None and self.total_bytes > self.device.total_bytes

    def describe(self) -> str:
        gib = lambda n: f"{n / GIB:.1f}"  # noqa: E731
        memory = "VRAM" if self.device.kind == "cuda" else "memory"
        parts = ", ".join(f"{name} {gib(size)}" for name, size in self.parts.items())
        lines = [
            f"about {gib(self.total_bytes)} GiB of {memory} at the peak of a step "
            f"({self.family_label}, {self.precision}, {self.trainable_params / 1e6:.1f} M trainable parameters)",
            f"parts in GiB: {parts}",
            f"device: {self.device.describe()}",
        ]
        return "\n".join(lines + list(self.notes))


def estimate_memory(settings, family: FamilySpec, device: DeviceInfo) -> MemoryEstimate:
    size = model_size(settings.pretrained_model_name_or_path, family)
    family = size.apply_to(family)  # the model file's own parameter counts where its header can be read
    family = part_files_counted(settings, family)  # a FLUX transformer file's separate encoder and AE files
    choice = device.precision(settings)
    runs = choice.mode
    half = runs != "no"
    weight_bytes = 2 if half else 4
    frozen_bytes = 1 if choice.fp8_base else weight_bytes  # fp8_base: UNet/transformer and text encoders in float8
    te_cached = text_encoder_outputs_cached(settings, family)

    base = family.unet_params * frozen_bytes
    base += 0 if te_cached else sum(family.text_encoder_params) * frozen_bytes
    vae_bytes = 4 if (not half or (family.fp16_vae_overflows and settings.sdxl_no_half_vae)) else 2
    base += family.vae_params * vae_bytes  # cached latents are encoded on first use: the VAE stays for epoch 1

    trainable = lora_parameter_count(settings, family, te_cached)
    lora_weight_bytes = 2 if (settings.full_fp16 or settings.full_bf16) else 4
    lora = trainable * (2 * lora_weight_bytes + optimizer_facts(settings.optimizer).state_bytes)
    parts = {
        "base model": int(base),
        "LoRA + optimizer": int(lora),
        "activations or encoding": int(_working_bytes(settings, family, half, te_cached, frozen_bytes) * ALLOCATOR_SLACK),
        "runtime": int(RUNTIME_GIB[device.kind] * GIB),
    }
    # the precision actually used is in the first line; the preflight's precision check says why it differs
    notes = [size.note, "rough estimate (within about 30 %); the real peak shows in the progress panel once training runs"]
    return MemoryEstimate(device, parts, runs if half else "fp32", trainable, family.label, tuple(notes))


def _working_bytes(settings, family: FamilySpec, half: bool, te_cached: bool, encoder_bytes: int | None = None) -> float:
    """The largest of what runs on top of the weights: a step's activations, a VAE encode, or the text
    encoders while they cache their outputs before the first step."""
    width, height = settings.resolution
    samples = max(1, settings.train_batch_size) * width * height / REFERENCE_PIXELS
    precision_factor = 1 if half else FP32_ACTIVATION_FACTOR
    per_sample = family.checkpointed_activations_gib if settings.gradient_checkpointing else family.activations_gib
    activations = per_sample * GIB * samples * precision_factor
    # cached: vae_batch_size images at a time, between steps; else the training batch, every step
    latents_cached = settings.cache_latents and not (settings.color_aug or settings.random_crop)
    encoded = max(1, int(settings.vae_batch_size or 1)) * width * height / REFERENCE_PIXELS if latents_cached else samples
    vae_encode = VAE_ENCODE_GIB_PER_SAMPLE * GIB * encoded * precision_factor
    encoders = sum(family.text_encoder_params) * (encoder_bytes or (2 if half else 4)) if te_cached else 0
    return max(activations, vae_encode, encoders)


def text_encoder_outputs_cached(settings, family: FamilySpec) -> bool:
    """As the trainer decides: the family's cache setting, or text encoders that are not trained and captions
    that never change (no shuffling, tag or caption dropout), so each caption is encoded once."""
    from trainer.data.captions import CaptionConfig

    if family.te_output_cache_setting and getattr(settings, family.te_output_cache_setting, False):
        return True
    return settings.train_lrs()[1] <= 0 and CaptionConfig.from_settings(settings).is_static


def lora_parameter_count(settings, family: FamilySpec, te_cached: bool = False) -> int:
    """Low-rank factors per rank; never more than the weights they change (LyCORIS LoKr's rank 100000 means
    "full matrix" and Native Fine-Tuning trains a full copy: both are at most the model's own size)."""
    unet_lr, te_lr = settings.train_lrs()
    count = 0
    if unet_lr > 0:
        unet = settings.network_dim * family.unet_lora_per_rank
        if settings.LoRA_type in LOCON_TYPES and settings.conv_dim > 0:
            unet += settings.conv_dim * family.unet_conv_per_rank
        count += min(unet, family.unet_params)
    if te_lr > 0 and not te_cached:
        count += min(settings.network_dim * family.text_encoder_lora_per_rank, sum(family.text_encoder_params))
    return count


@preflight_check("memory.estimate")
def check_memory(ctx: CheckContext):
    estimate = ctx.memory
    device = estimate.device
    # a group's processes on a CPU each hold the whole run in the same memory (on GPUs: one card each)
    copies = GroupLayout.of(ctx.settings).per_machine if device.kind != "cuda" else 1
    need_bytes = estimate.total_bytes * copies
    need = need_bytes / GIB
    times = f" ({copies} processes × {estimate.total_bytes / GIB:.1f} GiB)" if copies > 1 else ""
    if device.total_bytes is not None and need_bytes > device.total_bytes:
        have = device.total_bytes / GIB
        what = "the card's VRAM" if device.kind == "cuda" else "this computer's memory"
        yield Problem(
            "warning", None,
            f"this run needs about {need:.1f} GiB{times}, more than {what} ({have:.1f} GiB on {device.name}); "
            "it will probably stop with out of memory",
            fix=memory_advice(ctx.settings, device, short=True),
        )
    elif device.available_bytes is not None and need_bytes > device.available_bytes:
        free = device.available_bytes / GIB
        yield Problem(
            "warning", None,
            f"this run needs about {need:.1f} GiB{times} but only {free:.1f} GiB is free on {device.name} right now; "
            "other programs are using the rest",
            fix="close other programs that use the GPU (or memory), or " + memory_advice(ctx.settings, device, short=True),
        )
