"""The UNet's building blocks: resnets, spatial transformers, and the blocks that hold them.

Module and attribute names are diffusers' (``ResnetBlock2D.norm1``,
``Transformer2DModel.transformer_blocks.0.attn1.to_q``, ``downsamplers.0.conv`` ...),
so diffusers weights load as they are and LoRA names come out as sd-scripts writes
them. The forwards are only the arithmetic: no per-call config checks, no
``/ 1.0`` output scales, no p=0 dropouts, so a step issues fewer small ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.models.attention import AttentionFn, sdpa_attention
from trainer.models.resample import Downsample2D, Upsample2D


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """``temb_act`` is SiLU(time embedding), computed once per UNet call for every resnet."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(temb_act)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Multi-head attention with diffusers' layer names (bias-free q/k/v, biased output)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.attend: AttentionFn = sdpa_attention  # UNet.set_attention_backend swaps it
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, batch: int = 1) -> torch.Tensor:
        """``x``/``context``: tokens as rows (batch * tokens, channels), or (batch, tokens, channels)."""
        context = x if context is None else context
        out = self.attend(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, batch)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        # net.1 is diffusers' Dropout (no weights): index 2 keeps the key ``ff.net.2``
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, batch: int = 1) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), batch=batch)
        x = x + self.attn2(self.norm2(x), context, batch)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in (1x1 conv, or linear for SD2/SDXL), blocks, project out."""

    def __init__(self, channels: int, heads: int, layers: int, context_dim: int, groups: int, linear: bool) -> None:
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, context_dim, heads, channels // heads) for _ in range(layers)
        )
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        # tokens as rows, (batch * tokens, channels): every Linear below is then one addmm, no views
        h = h.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
        context = context.reshape(-1, context.shape[-1])
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, batch)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()
        if not self.linear:
            h = self.proj_out(h)
        return h + x


class UNetBlock(nn.Module):
    """One down, mid or up block: resnets, optional transformers after each, optional resampler.

    The attribute names (``resnets``, ``attentions``, ``downsamplers``/``upsamplers``) are
    diffusers'; which of them a block has is what its diffusers class name said.
    """

    def __init__(self, resnets: list[ResnetBlock2D], attentions: list[Transformer2DModel] | None,
                 downsample: Downsample2D | None = None, upsample: Upsample2D | None = None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        # None where the diffusers block has none (code that walks blocks tests for it)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.downsamplers = nn.ModuleList([downsample]) if downsample is not None else None
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None
        self.gradient_checkpointing = False

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def down(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, list]:
        outputs = []
        attentions = self.attentions
        for index, resnet in enumerate(self.resnets):
            x = self._run(resnet, x, temb)
            if attentions is not None:
                x = self._run(attentions[index], x, context)
            outputs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outputs.append(x)
        return x, outputs

    def mid(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self._run(self.resnets[0], x, temb)
        for attention_block, resnet in zip(self.attentions, self.resnets[1:]):
            x = self._run(attention_block, x, context)
            x = self._run(resnet, x, temb)
        return x

    def up(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
           size: tuple[int, int] | None) -> torch.Tensor:
        attentions = self.attentions
        for index, resnet in enumerate(self.resnets):
            x = self._run(resnet, torch.cat([x, skips.pop()], dim=1), temb)
            if attentions is not None:
                x = self._run(attentions[index], x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x
