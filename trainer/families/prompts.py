"""Captions to UNet conditioning, without repeating work.

Token ids are cached per caption string (captions repeat every epoch). When the
text encoder is not trained and captions never change (no shuffle, no dropout),
its outputs are cached per caption too, so a step runs no text encoder at all.

With ``weighted`` (kohya's ``weighted_captions``) a caption's ``(word)``, ``(word:1.3)`` and ``[word]`` weights
multiply the text encoder's output at those words' tokens, as sd-scripts' strategies do
(``tokenize_with_weights`` / ``encode_tokens_with_weights``): the brackets are parsed as sd-scripts'
``parse_prompt_attention`` parses them, each piece is tokenized on its own, BOS/EOS/padding keep weight 1, and the
hidden states are multiplied per token (no rescaling to the original mean: sd-scripts' current code does none; its
older ``get_weighted_text_embeddings`` did). The pooled SDXL embedding is not weighted.
"""
from __future__ import annotations

import contextlib
import re
from types import SimpleNamespace
from typing import Any, Callable, Iterable

import torch

from trainer.families.clip_text import CHUNK, tokenize_chunks

ROUND_BRACKET = 1.1
SQUARE_BRACKET = 1 / 1.1
# One lexeme of a weighted caption: an escape, a bracket, ":<number>)" closing a weight, plain text, or a lone ":".
_ATTENTION = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")


class PromptEncoder:
    def __init__(self, family: Any, clip_skip: int, max_token_length: int, cache_outputs: bool,
                 autocast: Callable[[], Any] = contextlib.nullcontext, weighted: bool = False) -> None:
        self.family = family
        self.weighted = weighted
        self._weights: dict[str, torch.Tensor] = {}
        self.clip_skip = int(clip_skip or 0)
        self.max_token_length = int(max_token_length or 75)
        self.cache_outputs = cache_outputs
        self.autocast = autocast
        self._tokens: dict[str, Any] = {}
        self._outputs: dict[str, Any] = {}

    def tokens(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._tokens]
        if missing and self.weighted:
            ids, weights = self.family.tokenize_weighted(missing, self.max_token_length)
            self._tokens.update(zip(missing, ids))
            self._weights.update(zip(missing, weights))
        elif missing:
            ids = self.family.tokenize(missing, self.max_token_length)
            self._tokens.update(zip(missing, ids))
        return torch.stack([self._tokens[c] for c in captions])

    def _encode(self, captions: list[str]) -> Any:
        cond = self.family.encode_prompt(self.tokens(captions), self.clip_skip)
        if self.weighted:
            cond = self.family.weight_prompt(cond, torch.stack([self._weights[c] for c in captions]))
        return cond

    def __call__(self, captions: list[str], train_text_encoder: bool) -> Any:
        if self.cache_outputs:
            self.precompute(captions)
            return self.family.stack_prompts([self._outputs[c] for c in captions])
        with torch.set_grad_enabled(train_text_encoder and torch.is_grad_enabled()):
            return self._encode(captions)

    def precompute(self, captions: Iterable[str], batch_size: int = 32) -> int:
        """Encode every caption not cached yet (frozen text encoder); returns how many were new."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._outputs]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            with torch.no_grad(), self.autocast():
                cond = self._encode(chunk)
            for index, caption in enumerate(chunk):
                self._outputs[caption] = self.family.select_prompt(cond, index)
        return len(missing)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A caption's pieces with their weights, as sd-scripts' (and AUTOMATIC1111's) ``parse_prompt_attention``:
    ``(x)`` times 1.1, ``[x]`` divided by 1.1, ``(x:w)`` times w, nesting multiplies, an unclosed bracket
    applies to the rest, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal, and neighbours of equal weight merge."""
    pieces: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        lexeme, weight = match.group(0), match.group(1)
        if lexeme.startswith("\\"):
            pieces.append([lexeme[1:], 1.0])
        elif lexeme == "(":
            open_round.append(len(pieces))
        elif lexeme == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale(open_round.pop(), float(weight))
        elif lexeme == ")" and open_round:
            scale(open_round.pop(), ROUND_BRACKET)
        elif lexeme == "]" and open_square:
            scale(open_square.pop(), SQUARE_BRACKET)
        else:
            pieces.append([lexeme, 1.0])
    for start in open_round:
        scale(start, ROUND_BRACKET)
    for start in open_square:
        scale(start, SQUARE_BRACKET)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text_, weight_) for text_, weight_ in merged]


def weighted_token_rows(tokenizer: Any, captions: list[str], max_token_length: int
                        ) -> tuple[list[list[int]], torch.Tensor]:
    """Each caption as ``BOS + tokens + EOS + padding`` (n_chunks * 75 + 2 ids, the tokens of each weighted piece
    tokenized on their own) and the weight of each of those positions (1 for BOS, EOS and padding): (B, n*75 + 2)."""
    n_chunks = max(1, max_token_length // CHUNK)
    room = n_chunks * CHUNK
    rows, weights = [], []
    for caption in captions:
        ids: list[int] = []
        row_weights: list[float] = []
        for piece, weight in parse_prompt_attention(caption):
            piece_ids = tokenizer(piece).input_ids[1:-1]
            ids += piece_ids
            row_weights += [weight] * len(piece_ids)
            if len(ids) >= room:
                break
        ids, row_weights = ids[:room], row_weights[:room]
        padding = room - len(ids)
        rows.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        weights.append([1.0, *row_weights] + [1.0] * (padding + 1))
    return rows, torch.tensor(weights, dtype=torch.float32)


def tokenize_weighted(tokenizer: Any, captions: list[str], max_token_length: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n_chunks, 77) ids in ``tokenize_chunks``' layout, and (B, n_chunks * 75 + 2) weights, one per position
    of the conditioning ``encode_chunks`` makes of them."""
    rows, weights = weighted_token_rows(tokenizer, captions, max_token_length)
    return tokenize_chunks(_Pretokenized(tokenizer, rows), captions, max_token_length), weights


def weight_hidden_states(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, L, D) conditioning times (B, L) per-token weights."""
    return hidden * weights.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)


class _Pretokenized:
    """A tokenizer stand-in that returns rows already tokenized, so ``tokenize_chunks`` chunks them its own way."""

    def __init__(self, tokenizer: Any, rows: list[list[int]]) -> None:
        self.rows = rows
        self.pad_token_id, self.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    def __call__(self, captions: list[str], **_: Any) -> SimpleNamespace:
        return SimpleNamespace(input_ids=torch.tensor(self.rows, dtype=torch.long))
