"""Captions to UNet conditioning, without repeating work.

Token ids are cached per caption string (captions repeat every epoch). When the
text encoder is not trained and captions never change (no shuffle, no dropout),
its outputs are cached per caption too, so a step runs no text encoder at all.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch


class PromptEncoder:
    def __init__(self, family: Any, clip_skip: int, max_token_length: int, cache_outputs: bool,
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.family = family
        self.clip_skip = int(clip_skip or 0)
        self.max_token_length = int(max_token_length or 75)
        self.cache_outputs = cache_outputs
        self.autocast = autocast
        self._tokens: dict[str, Any] = {}
        self._outputs: dict[str, Any] = {}

    def tokens(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._tokens]
        if missing:
            ids = self.family.tokenize(missing, self.max_token_length)
            self._tokens.update(zip(missing, ids))
        return torch.stack([self._tokens[c] for c in captions])

    def __call__(self, captions: list[str], train_text_encoder: bool) -> Any:
        if self.cache_outputs:
            self.precompute(captions)
            return self.family.stack_prompts([self._outputs[c] for c in captions])
        with torch.set_grad_enabled(train_text_encoder and torch.is_grad_enabled()):
            return self.family.encode_prompt(self.tokens(captions), self.clip_skip)

    def precompute(self, captions: Iterable[str], batch_size: int = 32) -> int:
        """Encode every caption not cached yet (frozen text encoder); returns how many were new."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._outputs]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            with torch.no_grad(), self.autocast():
                cond = self.family.encode_prompt(self.tokens(chunk), self.clip_skip)
            for index, caption in enumerate(chunk):
                self._outputs[caption] = self.family.select_prompt(cond, index)
        return len(missing)
