"""Multi-head attention kernels for the lean models: PyTorch SDPA, or xformers on CUDA.

Inputs are (batch, tokens, heads * head_dim) projections; the output has the same
layout, ready for the output projection.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, inner = q.shape
    head_dim = inner // heads
    q = q.view(batch, -1, heads, head_dim).transpose(1, 2)
    k = k.view(batch, -1, heads, head_dim).transpose(1, 2)
    v = v.view(batch, -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, tokens, inner)


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    import xformers.ops  # only reached after load_xformers() succeeded

    batch, tokens, inner = q.shape
    head_dim = inner // heads
    shape = (batch, -1, heads, head_dim)
    out = xformers.ops.memory_efficient_attention(q.view(shape), k.view(shape), v.view(shape))
    return out.reshape(batch, tokens, inner)


def load_xformers(device: torch.device, dtype: torch.dtype) -> AttentionFn:
    """xformers' kernel if it runs here, else raises with the reason (the caller falls back to SDPA)."""
    if device.type != "cuda":
        raise RuntimeError("xformers needs an NVIDIA GPU (CUDA)")
    import xformers.ops

    probe = torch.zeros(1, 2, 1, 8, device=device, dtype=dtype)
    xformers.ops.memory_efficient_attention(probe, probe, probe)
    return xformers_attention



