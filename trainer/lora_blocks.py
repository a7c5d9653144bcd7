"""Block-wise LoRA (sd-scripts' networks.lora): a rank, alpha and learning-rate weight per UNet block, without torch.

sd-scripts numbers the UNet's blocks from the module's key name: SD 1.x/2.x have 25 (12 down, 1 mid, 12 up),
SDXL 23 (its time embedding, 9 input, 3 middle, 9 output, out). ``down_lr_weight``/``up_lr_weight`` take a
list or a curve name (cosine, sine, linear, reverse_linear, zeros, optionally ``+base``); a block whose weight
is 0 (or at most ``block_lr_zero_threshold``) gets no LoRA modules at all.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from trainer.problems import NekoyaError

DOWN_UP_BLOCKS = {False: 12, True: 9}  # per side: SD 1.x/2.x, SDXL
MID_BLOCKS = {False: 1, True: 3}
BLOCK_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
              "block_alphas", "conv_block_dims", "conv_block_alphas")
CURVES = ("cosine", "sine", "linear", "reverse_linear", "zeros")
_DIFFUSERS_BLOCK = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


class BlockSettingError(NekoyaError, ValueError):
    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def block_count(sgm_names: bool) -> int:
    total = DOWN_UP_BLOCKS[sgm_names] * 2 + MID_BLOCKS[sgm_names]
    return total + 2 if sgm_names else total  # SDXL: + time embedding and out


def block_index(lora_name: str, sgm_names: bool) -> int:
    """sd-scripts' get_block_index: the block of a UNet module key name (-1: not a UNet block)."""
    if not sgm_names:
        match = _DIFFUSERS_BLOCK.search(lora_name)
        if match:
            side, i, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
            index = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
            return 1 + index if side == "down" else DOWN_UP_BLOCKS[False] + 1 + index
        return DOWN_UP_BLOCKS[False] if "mid_block_" in lora_name else -1
    if not lora_name.startswith("lora_unet_"):
        return -1
    name = lora_name[len("lora_unet_"):]
    number = name.split("_")[2] if name.count("_") >= 2 else ""
    for start, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(start) and number.isdigit():
            return first + int(number)
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    return 22 if name.startswith("out_") else -1


@dataclass(frozen=True)
class BlockPlan:
    """Per-block ranks (0: no module), alphas, conv ranks/alphas (None: no 3x3 conv LoRA) and lr weights."""

    sgm_names: bool
    dims: tuple[int, ...]
    alphas: tuple[float, ...]
    conv_dims: tuple[int, ...] | None
    conv_alphas: tuple[float, ...] | None
    lr_weights: tuple[float, ...] | None

    def rank_for(self, lora_name: str, conv: bool) -> tuple[int, float]:
        index = block_index(lora_name, self.sgm_names)
        if conv:
            return (self.conv_dims[index], self.conv_alphas[index]) if self.conv_dims is not None else (0, 0.0)
        return self.dims[index], self.alphas[index]

    def lr_weight(self, lora_name: str) -> float:
        return 1.0 if self.lr_weights is None else self.lr_weights[block_index(lora_name, self.sgm_names)]


def block_plan(settings: Any, sgm_names: bool, conv_dim: int | None, conv_alpha: float) -> BlockPlan | None:
    """The block plan the settings ask for (None: no block setting is used), as sd-scripts' create_network
    builds it; ``conv_dim`` is the conv rank kohya_ss passes (None for Standard)."""
    lr_weights = _lr_weights(settings, sgm_names)
    if not _text(settings, "block_dims") and lr_weights is None:
        return None
    count = block_count(sgm_names)
    dims = _numbers(settings, "block_dims", count, int) or [int(settings.network_dim)] * count
    alphas = _numbers(settings, "block_alphas", count, float) or [float(settings.network_alpha)] * count
    conv_dims = _numbers(settings, "conv_block_dims", count, int)
    conv_alphas = None
    if conv_dims is not None:
        conv_alphas = _numbers(settings, "conv_block_alphas", count, float) or [float(conv_alpha)] * count
    elif conv_dim is not None:
        conv_dims, conv_alphas = [conv_dim] * count, [float(conv_alpha)] * count
    if lr_weights is not None:  # a block that does not learn gets no module (remove_block_dims_and_alphas)
        dims = [0 if w == 0 else d for d, w in zip(dims, lr_weights)]
        if conv_dims is not None:
            conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, lr_weights)]
    return BlockPlan(sgm_names, tuple(dims), tuple(alphas), _tuple(conv_dims), _tuple(conv_alphas),
                     _tuple(lr_weights))


def _lr_weights(settings: Any, sgm_names: bool) -> list[float] | None:
    down, mid, up = (_text(settings, k) for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"))
    if not (down or mid or up):
        return None
    side, middle = DOWN_UP_BLOCKS[sgm_names], MID_BLOCKS[sgm_names]
    threshold = _threshold(settings)
    weights = []
    for key, text, length in (("down_lr_weight", down, side), ("mid_lr_weight", mid, middle),
                              ("up_lr_weight", up, side)):
        values = _weights(key, text, length) if text else [1.0] * length
        if text:  # sd-scripts zeroes only the lists that were given
            values = [w if w > threshold else 0 for w in values]
        weights += values
    return [1.0] + weights + [1.0] if sgm_names else weights


def _weights(key: str, text: str, length: int) -> list[float]:
    """A list ("0,0,1,1": short lists are filled with 1, long ones cut) or a curve name (down/up only)."""
    if "," not in text and key != "mid_lr_weight":
        return _curve(key, text, length)
    try:
        values = [float(part) if part.strip() else 0.0 for part in text.split(",")]
    except ValueError:
        raise BlockSettingError(f"{key} {text!r}: write numbers separated by commas, e.g. 0,0,0.5,1", key) from None
    return (values + [1.0] * length)[:length]


def _curve(key: str, text: str, length: int) -> list[float]:
    name, _, base_text = text.partition("+")
    try:
        base = float(base_text) if base_text else 0.0
    except ValueError:
        raise BlockSettingError(f"{key} {text!r}: the part after + must be a number", key) from None
    steps = [i / (length - 1) for i in range(length)]
    curves = {
        "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)], "sine": [math.sin(math.pi * s / 2) for s in steps],
        "linear": steps, "reverse_linear": list(reversed(steps)), "zeros": [0.0] * length,
    }
    if name.strip() not in curves:
        raise BlockSettingError(f"{key} {text!r} is neither a list of numbers nor one of {', '.join(CURVES)}", key)
    return [w + base for w in curves[name.strip()]]


def _numbers(settings: Any, key: str, count: int, kind) -> list | None:
    text = _text(settings, key)
    if not text:
        return None
    try:
        values = [kind(part) for part in text.split(",")]
    except ValueError:
        raise BlockSettingError(f"{key}: write {count} whole numbers separated by commas" if kind is int
                                else f"{key}: write {count} numbers separated by commas", key) from None
    if len(values) != count:
        raise BlockSettingError(f"{key} has {len(values)} values; this model has {count} UNet blocks, so write "
                                f"{count}", key)
    return values


def _threshold(settings: Any) -> float:
    text = _text(settings, "block_lr_zero_threshold")
    try:
        return float(text) if text else 0.0
    except ValueError:
        raise BlockSettingError(f"block_lr_zero_threshold {text!r} is not a number", "block_lr_zero_threshold") from None


def _text(settings: Any, key: str) -> str:
    value = getattr(settings, key, "")
    return str(value).strip() if value is not None else ""


def _tuple(values) -> tuple | None:
    return tuple(values) if values is not None else None
