"""CLIP byte-level BPE vocabularies written as tokenizer folders, fully offline.

transformers 5's ``CLIPTokenizer`` only builds a working tokenizer through
``from_pretrained(folder)`` with ``vocab.json`` + ``merges.txt`` on disk, so both
vocabularies here are materialised as files:

* the real 49408-token CLIP vocabulary, rebuilt from the BPE merge list shipped
  once as ``configs/bpe_simple_vocab_16e6.txt.gz`` (MIT, from open_clip);
* a tiny 523-token byte-level vocabulary for test models (any text encodes
  through byte fallback).
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from trainer.models.clip_tokenizer import bytes_to_unicode

BPE_GZ = Path(__file__).parent / "configs" / "bpe_simple_vocab_16e6.txt.gz"
START, END = "<|startoftext|>", "<|endoftext|>"
REAL_VOCAB_SIZE = 49408
# Merges of the tiny vocabulary: enough to make "a photo of sks dog" multi-char
# tokens. A merge must never produce a bare "</w>" token.
TINY_MERGES = (
    ("s", "k"), ("sk", "s</w>"), ("d", "o"), ("do", "g</w>"),
    ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("o", "f</w>"),
)
TINY_VOCAB_SIZE = 512 + len(TINY_MERGES) + 2


def _vocab_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    base = list(bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges] + [START, END]
    return {tok: i for i, tok in enumerate(tokens)}


@lru_cache(maxsize=1)
def real_merges() -> tuple[tuple[str, str], ...]:
    """The 48894 merges of the real CLIP vocabulary (standard CLIP recipe)."""
    lines = gzip.open(BPE_GZ, "rt", encoding="utf-8").read().split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])


def write_tokenizer(folder: Path, *, real: bool, pad_token: str = END, max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs into ``folder``.

    ``pad_token`` is ``<|endoftext|>`` for SD1/CLIP-L and ``!`` for the OpenCLIP
    tokenizers of SD2 and SDXL's second encoder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = list(real_merges()) if real else list(TINY_MERGES)
    write_vocab_files(folder, merges)
    write_json(folder / "tokenizer_config.json", tokenizer_config(pad_token, max_length))
    write_json(folder / "special_tokens_map.json", special_tokens_map(pad_token))
    return folder


def write_vocab_files(folder: Path, merges: list[tuple[str, str]]) -> None:
    vocab = _vocab_from_merges(merges)
    write_json(folder / "vocab.json", vocab)
    text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(text, encoding="utf-8")


def tokenizer_config(pad_token: str, max_length: int = 77) -> dict:
    return {
        "add_prefix_space": False,
        "bos_token": START,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": END,
        "errors": "replace",
        "model_max_length": max_length,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": END,
    }


def special_tokens_map(pad_token: str) -> dict:
    return {"bos_token": START, "eos_token": END, "pad_token": pad_token, "unk_token": END}


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
