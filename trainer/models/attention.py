"""Multi-head attention kernels for the lean models: PyTorch SDPA, or xformers on CUDA.

Inputs are the q/k/v projections as (batch, tokens, heads * head_dim), or as 2-D rows
(batch * tokens, heads * head_dim) with ``batch`` given; the output has the layout of q,
ready for the output projection. (The UNet keeps tokens as 2-D rows: a Linear on rows is
one addmm, on 3-D input it adds views forward and backward, ~20 us a layer with its LoRA.)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# (q, k, v, heads, batch) -> attention output shaped like q
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, batch: int = 1) -> torch.Tensor:
    shape = (batch, -1, heads, q.shape[-1] // heads)
    out = F.scaled_dot_product_attention(q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2),
                                         v.view(shape).transpose(1, 2))
    return out.transpose(1, 2).reshape(q.shape)


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, batch: int = 1) -> torch.Tensor:
    import xformers.ops  # only reached after load_xformers() succeeded

    shape = (batch, -1, heads, q.shape[-1] // heads)
    out = xformers.ops.memory_efficient_attention(q.view(shape), k.view(shape), v.view(shape))
    return out.reshape(q.shape)


def load_xformers(device: torch.device, dtype: torch.dtype) -> AttentionFn:
    """xformers' kernel if it runs here, else raises with the reason (the caller falls back to SDPA)."""
    if device.type != "cuda":
        raise RuntimeError("xformers needs an NVIDIA GPU (CUDA)")
    import xformers.ops

    probe = torch.zeros(1, 2, 1, 8, device=device, dtype=dtype)
    xformers.ops.memory_efficient_attention(probe, probe, probe)
    return xformers_attention



