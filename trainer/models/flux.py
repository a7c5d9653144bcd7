"""FLUX.1's transformer in Black Forest Labs' own module layout (``double_blocks.N.img_attn.qkv`` ...).

Why own code: sd-scripts trains FLUX LoRAs on this layout, so a LoRA on the fused ``img_attn.qkv``
or on single blocks' ``linear1`` (q, k, v and the MLP input in one Linear) is one module here, named
as ``networks.lora_flux`` names it, and BFL/kohya_ss single files load without any key conversion.
diffusers' ``FluxTransformer2DModel`` splits those Linears, so its modules cannot carry those LoRAs;
``tests/test_flux_model.py`` checks that this model computes what diffusers' does on the same weights.

Inputs are sd-scripts': packed latents ``img`` (B, h*w, 64), ``img_ids`` (B, h*w, 3), T5 states
``txt`` with ``txt_ids``, CLIP-L's pooled vector ``y``, timesteps and guidance in [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev: True, schnell: False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = torch.einsum("...n,d->...nd", pos.double(), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs[..., 0] * xq_[..., 0] + freqs[..., 1] * xq_[..., 1]
    xk_out = freqs[..., 0] * xk_[..., 0] + freqs[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def attention(q, k, v, pe, mask=None) -> torch.Tensor:
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10_000, time_factor: float = 1000.0):
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return embedding.to(t) if torch.is_floating_point(t) else embedding


class EmbedND(nn.Module):
    def __init__(self, theta: int, axes_dim: tuple[int, ...]) -> None:
        super().__init__()
        self.theta, self.axes_dim = theta, tuple(axes_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """shift, scale, gate (twice for a double block), each (B, 1, dim)."""
        return list(self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1))


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3*H*D) -> q, k, v as (B, H, L, D)."""
    batch, length, _ = qkv.shape
    q, k, v = qkv.reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def _mlp(hidden: int, ratio: float) -> nn.Sequential:
    inner = int(hidden * ratio)
    return nn.Sequential(nn.Linear(hidden, inner, bias=True), nn.GELU(approximate="tanh"),
                         nn.Linear(inner, hidden, bias=True))


def _layer_norm(hidden: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(hidden, double=True))
            self.add_module(f"{stream}_norm1", _layer_norm(hidden))
            self.add_module(f"{stream}_attn", SelfAttention(hidden, num_heads, qkv_bias))
            self.add_module(f"{stream}_norm2", _layer_norm(hidden))
            self.add_module(f"{stream}_mlp", _mlp(hidden, mlp_ratio))

    def _qkv(self, x, mod, stream: str):
        attn = getattr(self, f"{stream}_attn")
        modulated = (1 + mod[1]) * getattr(self, f"{stream}_norm1")(x) + mod[0]
        q, k, v = split_heads(attn.qkv(modulated), self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def _finish(self, x, attn_out, mod, stream: str):
        x = x + mod[2] * getattr(self, f"{stream}_attn").proj(attn_out)
        mlp_in = (1 + mod[4]) * getattr(self, f"{stream}_norm2")(x) + mod[3]
        return x + mod[5] * getattr(self, f"{stream}_mlp")(mlp_in)

    def forward(self, img, txt, vec, pe, mask=None):
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv(img, img_mod, "img")
        txt_q, txt_k, txt_v = self._qkv(txt, txt_mod, "txt")
        out = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2),
                        pe, mask)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1]:]
        return self._finish(img, img_out, img_mod, "img"), self._finish(txt, txt_out, txt_mod, "txt")


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.hidden_size, self.num_heads = hidden, num_heads
        self.mlp_hidden_dim = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, hidden * 3 + self.mlp_hidden_dim)  # q, k, v and the MLP input
        self.linear2 = nn.Linear(hidden + self.mlp_hidden_dim, hidden)
        self.norm = QKNorm(hidden // num_heads)
        self.pre_norm = _layer_norm(hidden)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x, vec, pe, mask=None):
        shift, scale, gate = self.modulation(vec)
        x_mod = (1 + scale) * self.pre_norm(x) + shift
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe, mask), self.mlp_act(mlp)), 2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = _layer_norm(hidden)
        self.linear = nn.Linear(hidden, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


class Flux(nn.Module):
    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        c = self.config = config
        if sum(c.axes_dim) != c.head_dim:
            raise ValueError(f"axes_dim {c.axes_dim} must sum to the head size {c.head_dim}")
        self.pe_embedder = EmbedND(c.theta, c.axes_dim)
        self.img_in = nn.Linear(c.in_channels, c.hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        self.guidance_in = MLPEmbedder(256, c.hidden_size) if c.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qkv_bias) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth_single_blocks))
        self.final_layer = LastLayer(c.hidden_size, c.in_channels)
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_attention_mask=None):
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX model (dev) needs a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y.to(img.dtype))
        txt = self.txt_in(txt.to(img.dtype))
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        mask = _attention_mask(txt_attention_mask, img.shape[1])
        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, pe, mask)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, pe, mask)
        return self.final_layer(x[:, txt.shape[1]:], vec)


def _attention_mask(txt_mask: torch.Tensor | None, image_tokens: int) -> torch.Tensor | None:
    """apply_t5_attn_mask: padding T5 tokens are not attended to (every image token is)."""
    if txt_mask is None:
        return None
    ones = torch.ones(txt_mask.shape[0], image_tokens, device=txt_mask.device, dtype=torch.bool)
    return torch.cat((txt_mask.bool(), ones), dim=1)[:, None, None, :]


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches as tokens."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, packed_h: int, packed_w: int) -> torch.Tensor:
    b, _, ch = x.shape
    c = ch // 4
    return x.reshape(b, packed_h, packed_w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, packed_h * 2, packed_w * 2)


def image_ids(batch: int, packed_h: int, packed_w: int, device=None) -> torch.Tensor:
    ids = torch.zeros(packed_h, packed_w, 3, device=device)
    ids[..., 1] = torch.arange(packed_h, device=device)[:, None]
    ids[..., 2] = torch.arange(packed_w, device=device)[None, :]
    return ids.reshape(1, packed_h * packed_w, 3).expand(batch, -1, -1)


def axes_dim_for(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes of a head size: FLUX.1's (16, 56, 56) for 128, the same proportions for smaller test models."""
    first = head_dim // 8
    rest = (head_dim - first) // 2
    axes = (first, rest, head_dim - first - rest)
    if any(a % 2 for a in axes):
        raise ValueError(f"no RoPE split of head size {head_dim} into even axes")
    return axes
