"""sd-scripts' fp8_base: the frozen UNet and text encoders stored in float8_e4m3fn to halve their memory.

Autocast computes every matmul and convolution in the mixed precision (it casts the fp8 weight per call), so
the LoRA trains as before. Embeddings (lookups, not autocast ops, as sd-scripts keeps them) and the small norm
layers (which not every autocast backend casts) stay in the training precision.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
KEPT = (nn.Embedding, nn.LayerNorm, nn.GroupNorm)
# RMS norms of other libraries and models (T5's T5LayerNorm, FLUX's RMSNorm): multiplied by their weight outside
# autocast's casting, so they stay in the training precision too
KEPT_NAMES = ("LayerNorm", "RMSNorm")
# transformers' T5 feed-forward casts its input to the dtype of ``wo``'s weight before it (fp8 would round the
# activations); sd-scripts patches that forward, Nekoya keeps ``wo`` in the training precision instead
KEPT_CHILDREN = {"T5DenseGatedActDense": "wo", "T5DenseActDense": "wo"}


def store_frozen_weights_in_fp8(family: Any, keep_dtype: torch.dtype) -> int:
    """Cast the UNet and text encoders to fp8, embeddings and norms back to ``keep_dtype``; returns the bytes
    saved."""
    before = after = 0
    for model in (family.unet, *family.text_encoders):
        before += _bytes(model)
        model.to(FP8)
        for module in model.modules():
            if isinstance(module, KEPT) or type(module).__name__.endswith(KEPT_NAMES):
                module.to(keep_dtype)
            elif type(module).__name__ in KEPT_CHILDREN:
                getattr(module, KEPT_CHILDREN[type(module).__name__]).to(keep_dtype)
        after += _bytes(model)
    return before - after


def _bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
