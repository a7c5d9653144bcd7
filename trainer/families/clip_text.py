"""CLIP text conditioning as sd-scripts does it, including 150/225-token captions.

A long caption is tokenized to ``max_token_length + 2`` tokens and cut into chunks
of 75 tokens, each wrapped in BOS/EOS to a 77-token sequence and encoded on its
own. The hidden states are joined back as ``BOS state + 75 states per chunk + EOS
state``, so 150 tokens give a (152, D) conditioning.
"""
from __future__ import annotations

import torch

CHUNK = 75  # content tokens per CLIP window (77 with BOS and EOS)


def tokenize_chunks(tokenizer, captions: list[str], max_token_length: int) -> torch.Tensor:
    """(B, n_chunks, 77) token ids; n_chunks = max_token_length // 75."""
    n_chunks = max(1, max_token_length // CHUNK)
    ids = tokenizer(
        captions, padding="max_length", truncation=True, max_length=n_chunks * CHUNK + 2, return_tensors="pt"
    ).input_ids
    if n_chunks == 1:
        return ids[:, None, :]
    bos, eos = ids[:, :1], ids[:, -1:]
    chunks = [torch.cat([bos, ids[:, 1 + i * CHUNK : 1 + (i + 1) * CHUNK], eos], dim=1) for i in range(n_chunks)]
    out = torch.stack(chunks, dim=1)
    pad, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad != eos_id:  # SD2-style padding: close every chunk with EOS as sd-scripts does
        full = (out[:, :, -2] != eos_id) & (out[:, :, -2] != pad)
        out[:, :, -1] = torch.where(full, torch.full_like(out[:, :, -1], eos_id), out[:, :, -1])
        empty = out[:, :, 1] == pad
        out[:, :, 1] = torch.where(empty, torch.full_like(out[:, :, 1], eos_id), out[:, :, 1])
    return out


def clip_hidden_states(text_encoder, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """Last hidden state, or with clip_skip N > 1 the N-th from last with the final LayerNorm."""
    if clip_skip and clip_skip > 1:
        out = text_encoder(ids, output_hidden_states=True)
        final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        return final_norm(out.hidden_states[-clip_skip])
    return text_encoder(ids)[0]


def encode_chunks(text_encoder, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """(B, n, 77) ids -> (B, n*75 + 2, D) conditioning (77 tokens when n is 1)."""
    batch, n_chunks, length = ids.shape
    states = clip_hidden_states(text_encoder, ids.reshape(batch * n_chunks, length), clip_skip)
    states = states.reshape(batch, n_chunks, length, -1)
    if n_chunks == 1:
        return states[:, 0]
    middle = states[:, :, 1 : 1 + CHUNK].reshape(batch, n_chunks * CHUNK, -1)
    return torch.cat([states[:, 0, :1], middle, states[:, -1, -1:]], dim=1)
