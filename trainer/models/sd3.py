"""SD 3 / 3.5's MMDiT in Stability AI's own module layout (``joint_blocks.N.x_block.attn.qkv`` ...).

Why own code: sd-scripts trains SD3 LoRAs on this layout (``networks.lora_sd3`` targets every Linear of each
``SingleDiTBlock``), so a LoRA on the fused ``attn.qkv`` is one module here, named as sd-scripts and ComfyUI
name it, and SAI single files load without key conversion. diffusers' ``SD3Transformer2DModel`` splits qkv into
to_q/to_k/to_v, which cannot carry one LoRA with a shared down matrix; ``tests/test_sd3_family.py`` checks that
this model computes what diffusers' does on the same weights.

Covers SD3 Medium (no q/k norm), SD 3.5 Large (RMS q/k norm) and SD 3.5 Medium (MMDiT-X: a second self-attention
``attn2`` in the x blocks of the first layers). Inputs are sd-scripts': latents (B, 16, H, W), timesteps in
[0, 1000), the pooled CLIP-L+G vector ``y`` and the context (CLIP-L+G tokens padded to T5's width, then T5's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class MMDiTConfig:
    depth: int = 24  # SD3 Medium 24, SD 3.5 Large 38, SD 3.5 Medium 24
    hidden_size: int = 1536  # SAI: 64 * depth
    num_heads: int = 24  # SAI: depth (64 per head)
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 192
    adm_in_channels: int = 2048  # CLIP-L + CLIP-G pooled
    context_in_dim: int = 4096  # T5-XXL's width
    mlp_ratio: float = 4.0
    qk_norm: str | None = None  # "rms" for SD 3.5
    x_block_self_attn_layers: tuple[int, ...] = ()  # MMDiT-X (SD 3.5 Medium)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10_000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _mlp_embedder(in_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))


class Embedder(nn.Module):  # SAI's y_embedder / t_embedder: ``.mlp.0`` and ``.mlp.2``
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = _mlp_embedder(in_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype) * self.weight.to(dtype)


class Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AttentionLinears(nn.Module):
    def __init__(self, dim: int, num_heads: int, pre_only: bool, qk_norm: str | None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        norm = (lambda: RMSNorm(self.head_dim)) if qk_norm == "rms" else nn.Identity
        self.ln_q, self.ln_k = norm(), norm()

    def pre_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, heads, L, head_dim)."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        return self.ln_q(q).transpose(1, 2), self.ln_k(k).transpose(1, 2), v.transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    x = F.scaled_dot_product_attention(q, k, v)
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def _layer_norm(hidden: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)


class SingleDiTBlock(nn.Module):
    """One stream of a joint block (sd-scripts' class name: ``networks.lora_sd3`` targets it by this name)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qk_norm: str | None,
                 pre_only: bool = False, self_attn: bool = False) -> None:
        super().__init__()
        self.pre_only, self.self_attn = pre_only, self_attn
        self.norm1 = _layer_norm(hidden)
        self.attn = AttentionLinears(hidden, num_heads, pre_only, qk_norm)
        if self_attn:
            self.attn2 = AttentionLinears(hidden, num_heads, False, qk_norm)
        if not pre_only:
            self.norm2 = _layer_norm(hidden)
            self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        mods = 9 if self_attn else 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, mods * hidden))

    def modulation(self, c: torch.Tensor) -> list[torch.Tensor]:
        """shift/scale/gate for attention, then the MLP (then attn2 for MMDiT-X); shift and scale only if pre-only."""
        return list(self.adaLN_modulation(c).chunk(self.adaLN_modulation[1].out_features // c.shape[-1], dim=-1))

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor, mods: list[torch.Tensor],
               attn2_out: torch.Tensor | None = None) -> torch.Tensor:
        x = x + mods[2].unsqueeze(1) * self.attn.proj(attn_out)
        if attn2_out is not None:
            x = x + mods[8].unsqueeze(1) * self.attn2.proj(attn2_out)
        return x + mods[5].unsqueeze(1) * self.mlp(modulate(self.norm2(x), mods[3], mods[4]))


class MMDiTBlock(nn.Module):
    def __init__(self, config: MMDiTConfig, index: int) -> None:
        super().__init__()
        c = config
        self.context_block = SingleDiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qk_norm,
                                            pre_only=index == c.depth - 1)
        self.x_block = SingleDiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qk_norm,
                                      self_attn=index in c.x_block_self_attn_layers)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        ctx_mods, x_mods = self.context_block.modulation(c), self.x_block.modulation(c)
        ctx_q, ctx_k, ctx_v = self.context_block.attn.pre_attention(
            modulate(self.context_block.norm1(context), ctx_mods[0], ctx_mods[1]))
        x_norm = self.x_block.norm1(x)
        x_q, x_k, x_v = self.x_block.attn.pre_attention(modulate(x_norm, x_mods[0], x_mods[1]))
        out = _attend(torch.cat((ctx_q, x_q), 2), torch.cat((ctx_k, x_k), 2), torch.cat((ctx_v, x_v), 2))
        ctx_out, x_out = out[:, : context.shape[1]], out[:, context.shape[1]:]
        attn2_out = None
        if self.x_block.self_attn:
            attn2_out = _attend(*self.x_block.attn2.pre_attention(modulate(x_norm, x_mods[6], x_mods[7])))
        x = self.x_block.finish(x, x_out, x_mods, attn2_out)
        context = None if self.context_block.pre_only else self.context_block.finish(context, ctx_out, ctx_mods)
        return context, x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = _layer_norm(hidden)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        c = self.config = config
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = Embedder(256, c.hidden_size)
        self.y_embedder = Embedder(c.adm_in_channels, c.hidden_size)
        self.context_embedder = nn.Linear(c.context_in_dim, c.hidden_size)
        self.register_buffer("pos_embed", torch.zeros(1, c.pos_embed_max_size**2, c.hidden_size))
        self.joint_blocks = nn.ModuleList(MMDiTBlock(c, i) for i in range(c.depth))
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels)
        self.gradient_checkpointing = False
        self.scaled_positions = None  # trainer.families.sd3_pos_embed.ScaledPositions: sd-scripts' scaled tables

    @property
    def dtype(self) -> torch.dtype:
        return self.context_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.context_embedder.weight.device

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def position_table(self, h: int, w: int, device=None, dtype=None) -> torch.Tensor:
        """(S, S, D): the table an input of h x w patches is cropped from: the stored max_size x max_size one, or
        with ``scaled_positions`` set, sd-scripts' scaled table for that size."""
        if self.scaled_positions is not None:
            return self.scaled_positions.table(h, w, device or self.pos_embed.device, dtype or torch.float32)
        size = self.config.pos_embed_max_size
        if h > size or w > size:
            raise ValueError(f"{h * self.config.patch_size}x{w * self.config.patch_size} latents exceed this model's "
                             f"position table ({size * self.config.patch_size} latent pixels a side)")
        return self.pos_embed.reshape(size, size, -1)

    def position_table_size(self, h: int, w: int) -> int:
        """How many patches a side the table of an h x w input has (``position_table`` without building it)."""
        if self.scaled_positions is not None:
            return self.scaled_positions.table_size(h, w)
        return self.config.pos_embed_max_size

    def cropped_pos_embed(self, h: int, w: int, offsets=None, device=None, dtype=None) -> torch.Tensor:
        """(1, h·w, D): the centre h x w patch positions of the table (SAI's cropped_pos_embed); with ``offsets``
        (one (top, left) or None for the centre per sample, pos_emb_random_crop_rate's) (B, h·w, D)."""
        table = self.position_table(h, w, device, dtype)
        size = table.shape[0]
        centre = ((size - h) // 2, (size - w) // 2)
        crops = [centre] if offsets is None else [o or centre for o in offsets]
        dtype = dtype or table.dtype  # cast each crop, not the whole (maybe fp8) table
        return torch.stack([table[top:top + h, left:left + w, :].reshape(h * w, -1).to(dtype) for top, left in crops])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, context: torch.Tensor,
                pos_offsets=None) -> torch.Tensor:
        batch, _, height, width = x.shape
        p = self.config.patch_size
        h, w = height // p, width // p
        x = self.x_embedder(x) + self.cropped_pos_embed(h, w, pos_offsets, x.device, x.dtype).to(x.dtype)
        c = self.t_embedder(timestep_embedding(t, 256).to(x.dtype)) + self.y_embedder(y.to(x.dtype))
        context = self.context_embedder(context.to(x.dtype))
        for block in self.joint_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                context, x = checkpoint(block, context, x, c, use_reentrant=False)
            else:
                context, x = block(context, x, c)
        x = self.final_layer(x, c)
        out = self.config.out_channels
        x = x.reshape(batch, h, w, p, p, out).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(batch, out, h * p, w * p)
