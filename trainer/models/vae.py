"""Lean Stable Diffusion VAE: a plain-torch ``AutoencoderKL`` (SD 1.x / 2.x / SDXL).

Why: importing diffusers costs seconds at every training start, and the VAE only needs a
handful of conv blocks. The modules here keep diffusers' (0.42) attribute paths, so
``state_dict()`` keys and shapes are identical and diffusers VAE weights load with
``strict=True``; the outputs equal diffusers' within float32 tolerance. The forward path
drops what diffusers carries for other models: ``/ 1.0`` output scales, p=0 dropouts,
deprecation checks, processors (the mid-block attention calls SDPA directly).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.resample import Downsample2D, Upsample2D

EPS = 1e-6  # diffusers builds every VAE norm with eps=1e-6

DEFAULTS: dict[str, Any] = {  # diffusers 0.42 AutoencoderKL.__init__ defaults
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def _norm_act(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm then SiLU; in place when no graph is recorded (saves one activation-sized buffer)."""
    x = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResnetBlock2D(nn.Module):
    """norm-act-conv twice plus a (1x1-projected when the width changes) skip; no time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(_norm_act(self.norm2, self.conv1(_norm_act(self.norm1, x))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        # into the fresh conv output (autograd keeps conv inputs, not outputs): one large buffer fewer;
        # out of place when dtypes differ (autocast), where the sum takes the wider dtype
        return h.add_(skip) if h.dtype == skip.dtype else skip + h


class Attention(nn.Module):
    """The VAE mid-block self-attention: one head over all pixels, group norm in, residual out."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' [1] is a p=0 Dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.group_norm
        tokens = F.group_norm(x, n.num_groups, n.weight, n.bias, n.eps).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class UNetMidBlock2D(nn.Module):
    """resnet, (attention), resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Pixels -> mean and log-variance of the latent (2 * latent_channels maps)."""

    def __init__(self, cfg: SimpleNamespace):
        super().__init__()
        channels, groups = list(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        ins = [channels[0], *channels[:-1]]
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(cin, cout, cfg.layers_per_block, groups, i < len(channels) - 1)
            for i, (cin, cout) in enumerate(zip(ins, channels)))
        self.mid_block = UNetMidBlock2D(channels[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(_norm_act(self.conv_norm_out, self.mid_block(x)))


class Decoder(nn.Module):
    """Latents -> pixels (about [-1, 1], not clamped)."""

    def __init__(self, cfg: SimpleNamespace):
        super().__init__()
        channels, groups = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(channels[0], groups, cfg.mid_block_add_attention)
        ins = [channels[0], *channels[:-1]]
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(cin, cout, cfg.layers_per_block + 1, groups, i < len(channels) - 1)
            for i, (cin, cout) in enumerate(zip(ins, channels)))
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(_norm_act(self.conv_norm_out, x))


class DiagonalGaussianDistribution:
    """The encoder's posterior, with diffusers' clamp of the log-variance and its sampling."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * noise, the noise drawn like diffusers' ``randn_tensor`` (same generator, same latents)."""
        return self.mean + self.std * _randn(self.mean.shape, generator, self.parameters)

    def mode(self) -> torch.Tensor:
        return self.mean


def _randn(shape: torch.Size, generator: torch.Generator | list[torch.Generator] | None,
           like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (a CPU generator draws on the CPU), then moved."""
    generators = generator if isinstance(generator, list) else [generator]
    gen_device = generators[0].device if generators[0] is not None else like.device
    draw_device = torch.device("cpu") if gen_device.type == "cpu" else like.device
    if len(generators) == 1:
        noise = torch.randn(shape, generator=generators[0], device=draw_device, dtype=like.dtype)
    else:  # one generator per sample, as diffusers' list form
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=like.dtype)
                           for g in generators])
    return noise if draw_device == like.device else noise.to(like.device)


@dataclass
class AutoencoderKLOutput:
    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL`` with the same state_dict: ``encode(pixels).latent_dist``, ``decode(z).sample``."""

    def __init__(self, config: dict | None = None, **kwargs: Any):
        """``AutoencoderKL(config_dict)`` or diffusers-style ``AutoencoderKL(**config_dict)``."""
        super().__init__()
        self.config = _resolve_config({**(config or {}), **kwargs})
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        latent = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if cfg.use_post_quant_conv else None

    @classmethod
    def from_config(cls, config: dict) -> AutoencoderKL:
        """Build from the dict of a diffusers ``vae/config.json`` (random weights)."""
        return cls(config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, x: torch.Tensor) -> AutoencoderKLOutput:
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return AutoencoderKLOutput(DiagonalGaussianDistribution(h))

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return DecoderOutput(self.decoder(z))

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> DecoderOutput:
        dist = self.encode(sample).latent_dist
        return self.decode(dist.sample(generator) if sample_posterior else dist.mode())


def _resolve_config(config: dict) -> SimpleNamespace:
    """The full config (defaults filled in) after refusing values that would change the architecture."""
    cfg = {**DEFAULTS, **config}
    n = len(cfg["block_out_channels"])
    for key, wanted in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg[key])
        if len(types) != n or any(t != wanted for t in types):
            raise ValueError(f"VAE config: {key}={types} is not supported (only {n} x {wanted!r}, "
                             f"one per block_out_channels entry)")
    if cfg["act_fn"] not in ("silu", "swish"):
        raise ValueError(f"VAE config: act_fn={cfg['act_fn']!r} is not supported (only 'silu')")
    return SimpleNamespace(**cfg)
