"""The Stable Diffusion UNet (SD 1.x, 2.x, SDXL) without diffusers.

Same architecture, state-dict keys and numerics as diffusers'
``UNet2DConditionModel`` for the configurations these families use, built from
the same ``unet/config.json``. Training imports no diffusers (seconds and ~100 MB
at every start) and runs only the arithmetic (fewer small ops per step). A config
this class does not implement is refused by name rather than built wrongly.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.attention import AttentionFn
from trainer.models.resample import Downsample2D, Upsample2D
from trainer.models.unet_blocks import Attention, ResnetBlock2D, Transformer2DModel, UNetBlock

# diffusers' defaults for every key this class reads
DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}

# key -> the values this implementation builds (anything else changes the architecture)
SUPPORTED: dict[str, tuple] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "only_cross_attention": (False,), "dropout": (0.0,),
    "act_fn": ("silu",), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "addition_embed_type": (None, "text_time"), "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",),
    "mid_block_scale_factor": (1,), "center_input_sample": (False,), "cross_attention_norm": (None,),
    "mid_block_only_cross_attention": (None, False),
}
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def unet_config(config: dict) -> SimpleNamespace:
    """The full config (diffusers' defaults filled in), refusing what this class cannot build."""
    full = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, allowed in SUPPORTED.items():
        value = full[key]
        if isinstance(value, (list, tuple)):  # per-block flags (only_cross_attention): all must be allowed
            value = next((v for v in value if v not in allowed), allowed[0])
        if value not in allowed:
            raise ValueError(f"UNet config: {key}={value!r} is not supported (Stable Diffusion 1/2/XL UNets use "
                             f"{' or '.join(map(repr, allowed))})")
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        for name in full[key]:
            if name not in allowed:
                raise ValueError(f"UNet config: {key} contains {name!r}; supported: {', '.join(allowed)}")
    return SimpleNamespace(**full)


def _per_block(value: Any, count: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def sinusoidal_embedding(values: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float) -> torch.Tensor:
    """diffusers' ``get_timestep_embedding`` (float32, whatever the model's dtype)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=values.device) / (half - shift)
    angles = values[:, None].float() * torch.exp(exponent)[None, :]
    parts = (torch.cos(angles), torch.sin(angles)) if flip_sin_to_cos else (torch.sin(angles), torch.cos(angles))
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, 1, 0, 0)) if dim % 2 else emb


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = cfg = unet_config(config)
        channels = list(cfg.block_out_channels)
        n = len(channels)
        layers = _per_block(cfg.layers_per_block, n)
        depth = _per_block(cfg.transformer_layers_per_block, n)
        context = _per_block(cfg.cross_attention_dim, n)
        # diffusers' naming quirk: "attention_head_dim" is the head count unless num_attention_heads is set
        heads = _per_block(cfg.num_attention_heads or cfg.attention_head_dim, n)
        temb_dim = cfg.time_embedding_dim or channels[0] * 4
        groups, eps = cfg.norm_num_groups, cfg.norm_eps

        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
        self.add_embedding = None
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_dim)

        def transformer(width: int, head_count: int, layer_count: int, context_dim: int) -> Transformer2DModel:
            return Transformer2DModel(width, head_count, layer_count, context_dim, groups, cfg.use_linear_projection)

        self.down_blocks = nn.ModuleList()
        out_ch = channels[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            resnets = [ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_dim, groups, eps) for j in range(layers[i])]
            attentions = ([transformer(out_ch, heads[i], depth[i], context[i]) for _ in range(layers[i])]
                          if kind == "CrossAttnDownBlock2D" else None)
            down = Downsample2D(out_ch, cfg.downsample_padding) if i < n - 1 else None
            self.down_blocks.append(UNetBlock(resnets, attentions, downsample=down))

        mid = channels[-1]
        self.mid_block = UNetBlock(
            [ResnetBlock2D(mid, mid, temb_dim, groups, eps) for _ in range(2)],
            [transformer(mid, heads[-1], depth[-1], context[-1])],
        )

        r_channels, r_layers, r_heads = channels[::-1], layers[::-1], heads[::-1]
        r_depth = list(cfg.reverse_transformer_layers_per_block or depth[::-1])
        r_context = context[::-1]
        self.up_blocks = nn.ModuleList()
        out_ch = r_channels[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev_ch, out_ch = out_ch, r_channels[i]
            in_ch = r_channels[min(i + 1, n - 1)]
            count = r_layers[i] + 1
            resnets = [
                ResnetBlock2D((prev_ch if j == 0 else out_ch) + (in_ch if j == count - 1 else out_ch), out_ch,
                              temb_dim, groups, eps)
                for j in range(count)
            ]
            attentions = None
            if kind == "CrossAttnUpBlock2D":
                attentions = [transformer(out_ch, r_heads[i], r_depth[i], r_context[i]) for _ in range(count)]
            up = Upsample2D(out_ch) if i < n - 1 else None
            self.up_blocks.append(UNetBlock(resnets, attentions, upsample=up))

        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)
        self.num_upsamplers = n - 1

    @classmethod
    def from_config(cls, config: dict) -> "UNet2DConditionModel":
        return cls(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    # -- switches ---------------------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        for block in (*self.down_blocks, self.mid_block, *self.up_blocks):
            block.gradient_checkpointing = True

    def set_attention_backend(self, attend: AttentionFn) -> None:
        for module in self.modules():
            if isinstance(module, Attention):
                module.attend = attend

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict | None = None) -> torch.Tensor:
        """The noise (or v) prediction for ``sample`` at ``timestep``; SDXL reads ``added_cond_kwargs``
        (``text_embeds``: pooled text, ``time_ids``: size and crop conditioning)."""
        temb = self.time_embedding(self._time_features(sample, timestep))
        if self.add_embedding is not None:
            temb = temb + self.add_embedding(self._added_features(added_cond_kwargs, temb.dtype))
        temb_act = F.silu(temb)  # every resnet applies SiLU to the same embedding: do it once
        context = encoder_hidden_states

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, outputs = block.down(x, temb_act, context)
            skips.extend(outputs)
        x = self.mid_block.mid(x, temb_act, context)
        forward_size = any(s % 2**self.num_upsamplers for s in sample.shape[-2:])
        last = len(self.up_blocks) - 1
        for i, block in enumerate(self.up_blocks):
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            size = tuple(skips[-1].shape[2:]) if forward_size and i < last else None
            x = block.up(x, block_skips, temb_act, context, size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def _time_features(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        elif timestep.dim() == 0:
            timestep = timestep[None].to(sample.device)
        timestep = timestep.expand(sample.shape[0])
        cfg = self.config
        return sinusoidal_embedding(timestep, self.conv_in.out_channels, cfg.flip_sin_to_cos,
                                    cfg.freq_shift).to(sample.dtype)

    def _added_features(self, added: dict | None, dtype: torch.dtype) -> torch.Tensor:
        if not added or "text_embeds" not in added or "time_ids" not in added:
            raise ValueError("this UNet (addition_embed_type 'text_time', SDXL) needs added_cond_kwargs "
                             "with 'text_embeds' and 'time_ids'")
        text_embeds, time_ids = added["text_embeds"], added["time_ids"]
        cfg = self.config
        time_embeds = sinusoidal_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                           cfg.freq_shift).reshape(text_embeds.shape[0], -1)
        return torch.cat([text_embeds, time_embeds], dim=-1).to(dtype)
