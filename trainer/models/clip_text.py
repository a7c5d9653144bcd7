"""Lean CLIP text encoders: ``CLIPTextModel`` and ``CLIPTextModelWithProjection``.

Why: building transformers' CLIP costs an import of transformers (about a second and
tens of MB) at every training start. These plain ``torch.nn`` modules have the module
paths, state-dict keys and numerics of transformers 5's classes of the same names:

* ``CLIPTextModel``: ``embeddings.*``, ``encoder.layers.N.*``, ``final_layer_norm.*``
  (transformers 5 has no ``text_model.`` level here);
* ``CLIPTextModelWithProjection``: ``text_model.<the above>`` + ``text_projection.weight``.

LoRA finds the layers by the class names ``CLIPAttention`` (``q_proj``, ``k_proj``,
``v_proj``, ``out_proj``) and ``CLIPMLP`` (``fc1``, ``fc2``). The forward is causal SDPA
only: no padding masks, no attention outputs, no dropout (CLIP's is 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# transformers 5's CLIPTextConfig defaults.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
ACTIVATIONS = ("quick_gelu", "gelu")
LEGACY_EOS_ID = 2  # configs from before transformers PR #24773: pool at the highest id (argmax)


def make_config(config: dict | SimpleNamespace) -> SimpleNamespace:
    """The full config (defaults filled in) as a namespace; rejects what this module does not implement."""
    values = dict(vars(config) if isinstance(config, SimpleNamespace) else config)
    # A null in config.json means "the default" for the keys that have one.
    values = {**DEFAULTS, **{k: v for k, v in values.items() if v is not None or k not in DEFAULTS}}
    if values["hidden_act"] not in ACTIVATIONS:
        _unsupported("hidden_act", values["hidden_act"], "quick_gelu or gelu")
    if values["hidden_size"] % values["num_attention_heads"]:
        _unsupported("num_attention_heads", values["num_attention_heads"],
                     f"a divisor of hidden_size={values['hidden_size']}")
    if values["attention_dropout"]:
        _unsupported("attention_dropout", values["attention_dropout"], "0.0 (no dropout is implemented)")
    if not isinstance(values["eos_token_id"], int):
        _unsupported("eos_token_id", values["eos_token_id"], "a single token id")
    return SimpleNamespace(**values)


def _unsupported(key: str, value: Any, expected: str) -> None:
    raise ValueError(f"CLIP text encoder config: {key}={value!r} is not supported (expected {expected})")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


@dataclass
class _Output:
    """Attribute access plus transformers' ``out[i]`` over the fields that are not None."""

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, k) for k in self._order) if v is not None)

    def __getitem__(self, key: int | slice | str) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@dataclass
class CLIPTextOutput(_Output):
    """``out[0]`` is ``last_hidden_state`` (after the final LayerNorm), as in transformers."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    _order = ("last_hidden_state", "pooler_output", "hidden_states")


@dataclass
class CLIPTextProjectionOutput(_Output):
    """transformers' ``CLIPTextModelOutput``: ``out[0]`` is ``text_embeds``; ``pooler_output`` is extra."""

    text_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    pooler_output: torch.Tensor | None = None
    _order = ("text_embeds", "last_hidden_state", "hidden_states")


def _embedding(count: int, dim: int) -> nn.Embedding:
    """nn.Embedding, without its random init when built on the meta device to take loaded weights:
    a meta ``normal_`` imports torch._dynamo, 1.5 s of every start."""
    weight = torch.empty(count, dim)
    return nn.Embedding(count, dim, _weight=weight) if weight.is_meta else nn.Embedding(count, dim)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = _embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions 0..L-1: a slice of the table equals the lookup of arange(L).
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[-1]]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention through SDPA."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        # Creation order as in transformers, so state_dict() lists keys in the same order.
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor, batch: int = 1) -> torch.Tensor:
        """``hidden_states``: tokens as rows (batch * length, width), or (batch, length, width)."""
        shape = (batch, -1, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(hidden_states.shape))


class CLIPMLP(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.activation_fn = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, batch: int = 1) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), batch)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, output_hidden_states: bool = False):
        """Last layer's output, and (when asked) the input plus every layer's output, all (batch, length, width).

        The layers see tokens as rows, (batch * length, width): each Linear is then one addmm, without
        the views a 3-D input adds forward and backward."""
        states = [hidden_states] if output_hidden_states else None
        recompute = self.gradient_checkpointing and self.training
        shape = hidden_states.shape
        rows = hidden_states.reshape(-1, shape[-1])
        for layer in self.layers:
            if recompute:
                rows = checkpoint(layer, rows, shape[0], use_reentrant=False)
            else:
                rows = layer(rows, shape[0])
            if states is not None:
                states.append(rows.view(shape))
        return rows.view(shape), (tuple(states) if states is not None else None)


class _TextEncoderBase(nn.Module):
    """What both classes share: config, dtype/device, checkpointing switch, from_config."""

    config: SimpleNamespace

    @classmethod
    def from_config(cls, config: dict | SimpleNamespace):
        """Build (random weights) from the dict of a transformers ``config.json``."""
        return cls(config)

    def _text(self) -> CLIPTextModel:
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.get_input_embeddings().weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self._text().embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self._text().embeddings.token_embedding = value

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each encoder layer in backward (only while ``self.training``)."""
        self._text().encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self._text().encoder.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._text().encoder.gradient_checkpointing


class CLIPTextModel(_TextEncoderBase):
    """CLIP text transformer; ``model(input_ids, output_hidden_states=False) -> CLIPTextOutput``."""

    def __init__(self, config: dict | SimpleNamespace) -> None:
        super().__init__()
        self.config = config = make_config(config)
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.eos_token_id = config.eos_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: None = None,
                output_hidden_states: bool = False) -> CLIPTextOutput:
        if attention_mask is not None:
            raise ValueError("CLIPTextModel: attention_mask is not supported (CLIP text is causal only)")
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        hidden, states = self.encoder(self.embeddings(input_ids), output_hidden_states)
        last = self.final_layer_norm(hidden)
        return CLIPTextOutput(last, self._pool(last, input_ids), states)

    def _pool(self, last: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The state at each sequence's EOS, chosen by transformers 5's rule."""
        if self.eos_token_id == LEGACY_EOS_ID:
            index = input_ids.argmax(dim=-1)  # old configs: EOS is the highest id
        else:
            index = (input_ids == self.eos_token_id).int().argmax(dim=-1)  # first EOS (pad may equal EOS)
        rows = torch.arange(last.shape[0], device=last.device)
        return last[rows, index]


class CLIPTextModelWithProjection(_TextEncoderBase):
    """CLIP text transformer under ``text_model`` plus ``text_projection`` of the pooled state."""

    def __init__(self, config: dict | SimpleNamespace) -> None:
        super().__init__()
        self.config = config = make_config(config)
        self.text_model = CLIPTextModel(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def _text(self) -> CLIPTextModel:
        return self.text_model

    def forward(self, input_ids: torch.Tensor, attention_mask: None = None,
                output_hidden_states: bool = False) -> CLIPTextProjectionOutput:
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        embeds = self.text_projection(out.pooler_output)
        return CLIPTextProjectionOutput(embeds, out.last_hidden_state, out.hidden_states, out.pooler_output)
