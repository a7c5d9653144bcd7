"""Caption conditioning: 75-token chunks, clip skip, token and output caches."""
from __future__ import annotations

import pytest
import torch

from trainer.families.clip_text import encode_chunks, tokenize_chunks
from trainer.families.prompts import PromptEncoder

LONG = ", ".join(f"tag{i}" for i in range(60))  # well over 75 tokens


@pytest.fixture(scope="module")
def sd1_text(tiny_sd1_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_sd1_dir / "tokenizer"), CLIPTextModel.from_pretrained(tiny_sd1_dir / "text_encoder").eval()


@pytest.fixture(scope="module")
def sd2_tokenizer(tiny_sd2_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_sd2_dir / "tokenizer")


def test_chunks_wrap_each_window_in_bos_eos(sd1_text):
    tokenizer, _ = sd1_text
    ids = tokenize_chunks(tokenizer, ["a dog", LONG], 150)
    assert ids.shape == (2, 2, 77)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert (ids[:, :, 0] == bos).all() and (ids[:, :, -1] == eos).all()
    full = tokenizer([LONG], truncation=True, max_length=152, padding="max_length").input_ids[0]
    assert ids[1, 0, 1:76].tolist() == full[1:76] and ids[1, 1, 1:76].tolist() == full[76:151]
    assert tokenize_chunks(tokenizer, ["a dog"], 75).shape == (1, 1, 77)


def test_sd2_padding_closes_chunks_with_eos(sd2_tokenizer):
    tok = sd2_tokenizer
    assert tok.pad_token_id != tok.eos_token_id
    ids = tokenize_chunks(tok, ["a dog"], 150)
    # the second window is empty: BOS, then EOS where the first pad would be
    assert ids[0, 1, 0] == tok.bos_token_id and ids[0, 1, 1] == tok.eos_token_id


def test_encode_chunks_joins_states(sd1_text):
    tokenizer, encoder = sd1_text
    with torch.no_grad():
        short = encode_chunks(encoder, tokenize_chunks(tokenizer, ["a dog"], 75), clip_skip=1)
        long = encode_chunks(encoder, tokenize_chunks(tokenizer, ["a dog", LONG], 225), clip_skip=1)
        skip2 = encode_chunks(encoder, tokenize_chunks(tokenizer, ["a dog"], 75), clip_skip=2)
        direct = encoder(tokenize_chunks(tokenizer, ["a dog"], 75)[:, 0], output_hidden_states=True)
    hidden = encoder.config.hidden_size
    assert short.shape == (1, 77, hidden) and long.shape == (2, 3 * 75 + 2, hidden)
    torch.testing.assert_close(short, direct.last_hidden_state)
    torch.testing.assert_close(skip2, encoder.final_layer_norm(direct.hidden_states[-2]))


class CountingFamily:
    """Wraps the tiny SD1 text encoder and counts tokenizer and encoder calls."""

    def __init__(self, tokenizer, encoder):
        self.tokenizer, self.encoder = tokenizer, encoder
        self.tokenized, self.encoded = 0, 0

    def tokenize(self, captions, max_token_length):
        self.tokenized += len(captions)
        return tokenize_chunks(self.tokenizer, captions, max_token_length)

    def encode_prompt(self, tokens, clip_skip):
        self.encoded += tokens.shape[0]
        return encode_chunks(self.encoder, tokens, clip_skip)

    def select_prompt(self, cond, index):
        return cond[index]

    def stack_prompts(self, conds):
        return torch.stack(conds)


def test_prompt_encoder_caches_tokens_and_frozen_outputs(sd1_text):
    family = CountingFamily(*sd1_text)
    trained = PromptEncoder(family, clip_skip=1, max_token_length=75, cache_outputs=False)
    for _ in range(3):
        trained(["a dog", "a cat", "a dog"], train_text_encoder=True)
    assert family.tokenized == 2  # each distinct caption tokenized once
    assert family.encoded == 9  # a trained text encoder runs every step

    family = CountingFamily(*sd1_text)
    frozen = PromptEncoder(family, clip_skip=1, max_token_length=75, cache_outputs=True)
    assert frozen.precompute(["a dog", "a cat"]) == 2
    first = frozen(["a cat", "a dog"], train_text_encoder=False)
    again = frozen(["a cat", "a dog"], train_text_encoder=False)
    assert family.encoded == 2 and torch.equal(first, again)
    with torch.no_grad():
        expected = encode_chunks(family.encoder, tokenize_chunks(family.tokenizer, ["a cat", "a dog"], 75), 1)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
