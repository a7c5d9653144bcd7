"""The CLIP byte-level BPE tokenizer, in plain Python, equal in ids to transformers 5's ``CLIPTokenizer``.

Why: importing transformers costs about a second at every training start, only to
tokenize captions. This reads the same tokenizer folder (``vocab.json`` + ``merges.txt``,
or ``tokenizer.json``, plus ``special_tokens_map.json`` / ``tokenizer_config.json``) and
reproduces the pipeline of transformers 5's tokenizers-backed ``CLIPTokenizer``:

1. special tokens (bos/eos/unk/pad, e.g. ``!`` for OpenCLIP) are split out of the raw
   text first, case-sensitively, and map straight to their ids;
2. each remaining segment is NFC-normalised and lowercased character by character
   (the Rust normaliser has no final-sigma rule, so neither do we); whitespace runs
   only separate words, so they need no rewriting;
3. the CLIP regex cuts words, each is byte-level encoded and BPE-merged with ``</w>``
   on its last symbol (cached per word).
"""
from __future__ import annotations

import json
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

import regex

START, END = "<|startoftext|>", "<|endoftext|>"
VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when a folder sets none
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_SPECIALS = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}
# The pre-tokenizer regex of transformers' CLIPTokenizer. The regex module's \s is the
# same set as the Rust (Oniguruma) one, checked over every code point.
WORD_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# A lowercased "<|endoftext|>" typed in a caption matches the regex whole; the byte-level
# pre-tokenizer that follows in transformers cuts it again into these three words.
SPECIAL_WORD_PARTS = {START: ("<|", "startoftext", "|>"), END: ("<|", "endoftext", "|>")}
CACHE_LIMIT = 100_000


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The CLIP/GPT-2 reversible byte -> printable unicode table (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


# str.translate table: a UTF-8 byte seen as a latin-1 char -> its byte-level char.
BYTE_TABLE = {byte: char for byte, char in bytes_to_unicode().items()}


def _lower(text: str) -> str:
    # Python's str.lower() turns a word-final capital sigma into "ς"; the Rust
    # normaliser lowercases char by char and gives "σ".
    if "Σ" in text:
        return "".join(c.lower() for c in text)
    return text.lower()


def normalize(text: str) -> str:
    """NFC + lowercase, as transformers' normaliser (whitespace is left to the word regex)."""
    if text.isascii():
        return text.lower()
    return _lower(unicodedata.normalize("NFC", text))


class BatchEncoding(dict):
    """``{"input_ids": ..., "attention_mask": ...}`` with attribute access, like transformers'."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CLIPTokenizer:
    """CLIP BPE tokenizer; build it with :meth:`from_pretrained` on a tokenizer folder."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[str] | list[tuple[str, str]],
        *,
        special_tokens: dict[str, str] | None = None,
        model_max_length: int = VERY_LARGE_INTEGER,
        extra_special_tokens: tuple[str, ...] = (),
    ) -> None:
        self.encoder = vocab
        # Merges stay "a b" strings (byte-level symbols hold no space): no tuples to build at load.
        self.merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
        self.bpe_ranks = dict(zip(self.merges, range(len(self.merges))))
        self.special_tokens = {**DEFAULT_SPECIALS, **(special_tokens or {})}
        self.model_max_length = model_max_length
        specials = list(dict.fromkeys([*self.special_tokens.values(), *extra_special_tokens]))
        for token in specials:  # transformers appends special tokens missing from the vocab
            self.encoder.setdefault(token, len(self.encoder))
        self.special_ids = {t: self.encoder[t] for t in specials}
        # Longest first, so the leftmost match is also the longest one.
        alternatives = "|".join(regex.escape(t) for t in sorted(specials, key=len, reverse=True))
        self._special_re = regex.compile(f"({alternatives})")
        self._cache: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
        self._decoder: dict[int, str] | None = None

    # -- loading and saving ------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> CLIPTokenizer:
        """Read a tokenizer folder as transformers does (special_tokens_map.json wins over tokenizer_config.json).

        ``subfolder`` is honoured; other transformers keywords (``local_files_only`` ...) are ignored.
        """
        folder = Path(folder) / overrides.get("subfolder", "")
        vocab, merges = _read_vocab(folder)
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        specials = {}
        for key in SPECIAL_KEYS:
            value = overrides.get(key, special_map.get(key, config.get(key)))
            if value is not None:
                specials[key] = _token_content(value)
        extra = [_token_content(t) for t in special_map.get("additional_special_tokens", [])]
        extra += [_token_content(t) for t in config.get("added_tokens_decoder", {}).values()]
        max_length = overrides.get("model_max_length", config.get("model_max_length", VERY_LARGE_INTEGER))
        return cls(vocab, merges, special_tokens=specials, model_max_length=int(max_length),
                   extra_special_tokens=tuple(extra))

    def save_pretrained(self, folder: str | Path) -> tuple[str, ...]:
        """Write vocab.json, merges.txt and the token configs that transformers' CLIPTokenizer reads back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "vocab.json", self.encoder)
        merges = "#version: 0.2\n" + "".join(m + "\n" for m in self.merges)
        (folder / "merges.txt").write_text(merges, encoding="utf-8")
        config = {
            "add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
            "errors": "replace", **self.special_tokens, "model_max_length": self.model_max_length,
            "tokenizer_class": "CLIPTokenizer",
        }
        _write_json(folder / "tokenizer_config.json", dict(sorted(config.items())))
        _write_json(folder / "special_tokens_map.json", dict(sorted(self.special_tokens.items())))
        names = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
        return tuple(str(folder / n) for n in names)

    # -- special tokens ----------------------------------------------------------------
    @property
    def bos_token(self) -> str:
        return self.special_tokens["bos_token"]

    @property
    def eos_token(self) -> str:
        return self.special_tokens["eos_token"]

    @property
    def pad_token(self) -> str:
        return self.special_tokens["pad_token"]

    @property
    def unk_token(self) -> str:
        return self.special_tokens["unk_token"]

    @property
    def bos_token_id(self) -> int:
        return self.encoder[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self.encoder[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self.encoder[self.pad_token]

    @property
    def unk_token_id(self) -> int:
        return self.encoder[self.unk_token]

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __len__(self) -> int:
        return len(self.encoder)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.encoder)

    # -- encoding ----------------------------------------------------------------------
    def _bpe(self, word: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """BPE of one regex word (cached): merge the lowest-ranked pair everywhere, repeat."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        chars = word.encode("utf-8").decode("latin-1").translate(BYTE_TABLE)
        symbols = [*chars[:-1], chars[-1] + "</w>"]
        get = self.bpe_ranks.get
        while len(symbols) > 1:
            pairs = [a + " " + b for a, b in zip(symbols, symbols[1:])]
            ranks = [get(p, VERY_LARGE_INTEGER) for p in pairs]
            best = min(ranks)
            if best == VERY_LARGE_INTEGER:
                break
            symbols = _merge(symbols, pairs[ranks.index(best)].split(" "))
        tokens = tuple(symbols)
        get, unk = self.encoder.get, self.unk_token_id
        result = tokens, tuple([get(t, unk) for t in tokens])
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = result
        return result

    def _segments(self, text: str):
        """Yield ("special", token) or ("text", normalized segment) in order."""
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:
                yield True, part
            elif part:
                yield False, normalize(part)

    def _words(self, segment: str) -> list[str]:
        words = WORD_RE.findall(segment)
        if START in words or END in words:
            words = [p for w in words for p in SPECIAL_WORD_PARTS.get(w, (w,))]
        return words

    def tokenize(self, text: str) -> list[str]:
        """BPE token strings of ``text`` (no BOS/EOS added)."""
        tokens: list[str] = []
        for special, part in self._segments(text):
            if special:
                tokens.append(part)
                continue
            for word in self._words(part):
                tokens.extend(self._bpe(word)[0])
        return tokens

    def _content_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for special, part in self._segments(text):
            if special:
                ids.append(self.special_ids[part])
                continue
            for word in self._words(part):
                ids.extend(self._bpe(word)[1])
        return ids

    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool = False,
               max_length: int | None = None) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens, truncation=truncation,
                    max_length=max_length)["input_ids"]

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        **_ignored: Any,
    ) -> BatchEncoding:
        """Encode like transformers: BOS + ids + EOS, truncated/padded (right) to ``max_length``."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        limit = max_length if max_length is not None else self.model_max_length
        extra = 2 if add_special_tokens else 0
        rows = []
        for t in texts:
            ids = self._content_ids(t)
            if truncation and truncation != "do_not_truncate":
                ids = ids[: max(limit - extra, 0)]
            rows.append([self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids)
        masks = [[1] * len(r) for r in rows]
        target = _pad_length(padding, limit, rows)
        if target is not None:
            pad = self.pad_token_id
            masks = [m + [0] * (target - len(r)) for m, r in zip(masks, rows)]
            rows = [r + [pad] * (target - len(r)) for r in rows]
        return _batch(rows, masks, single, return_tensors)

    # -- decoding ----------------------------------------------------------------------
    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        unk = self.unk_token_id
        if isinstance(tokens, str):
            return self.encoder.get(tokens, unk)
        return [self.encoder.get(t, unk) for t in tokens]

    @property
    def decoder(self) -> dict[int, str]:
        if self._decoder is None:
            self._decoder = {i: t for t, i in self.encoder.items()}
        return self._decoder

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.decoder[ids]
        return [self.decoder[int(i)] for i in ids]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``: byte-level decoded, each ``</w>`` read as a space."""
        tokens = [self.decoder[int(i)] for i in ids]
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in self.special_ids]
        byte_of = _unicode_to_bytes()
        data = bytes(byte_of.get(c, 32) for c in "".join(tokens))
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _merge(symbols: list[str], pair: list[str]) -> list[str]:
    first, second = pair
    merged, i, n = [], 0, len(symbols)
    while i < n:
        if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _pad_length(padding: bool | str, limit: int, rows: list[list[int]]) -> int | None:
    if padding == "max_length":  # with no length known, transformers does not pad either
        return limit if limit < VERY_LARGE_INTEGER else None
    if padding is True or padding == "longest":
        return max((len(r) for r in rows), default=0)
    return None


def _batch(rows: list[list[int]], masks: list[list[int]], single: bool, return_tensors: str | None) -> BatchEncoding:
    if return_tensors == "pt":
        import torch

        if len({len(r) for r in rows}) > 1:
            raise ValueError("sequences of different lengths: pass padding=True or padding='max_length'")
        return BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long),
                             attention_mask=torch.tensor(masks, dtype=torch.long))
    if return_tensors is not None:
        raise ValueError(f"return_tensors={return_tensors!r} is not supported (use 'pt' or None)")
    if single:
        return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
    return BatchEncoding(input_ids=rows, attention_mask=masks)


def _read_vocab(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        vocab = _read_json(folder / "vocab.json")
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        start = 1 if lines and lines[0].startswith("#version") else 0
        return vocab, [line for line in lines[start:] if line]
    if (folder / "tokenizer.json").exists():  # a folder saved by transformers 5
        model = _read_json(folder / "tokenizer.json")["model"]
        return model["vocab"], model["merges"]
    raise FileNotFoundError(f"{folder}: no vocab.json + merges.txt nor tokenizer.json")


def _token_content(value: Any) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
