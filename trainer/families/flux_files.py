"""Where FLUX.1's tokenizers come from, torch-free (the check asks before anything is loaded).

kohya_ss's t5xxl file holds no tokenizer; sd-scripts takes T5's from the Hugging Face hub (google/t5-v1_1-xxl).
Nekoya never downloads: it reads a ``<t5xxl file>.tokenizers/`` folder, the t5xxl file's own folder
(``tokenizer.json`` or ``spiece.model``), or that hub id in the local Hugging Face cache.
"""
from __future__ import annotations

from pathlib import Path

TOKENIZER_SIDECAR = ".tokenizers"
T5_HUB_ID = "google/t5-v1_1-xxl"
T5_TOKENIZER_FIX = (f"put T5's tokenizer files (tokenizer.json or spiece.model) next to the t5xxl file, or have "
                    f"{T5_HUB_ID} in the local Hugging Face cache")


def has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()


def find_t5_tokenizer(source: Path) -> Path | None:
    """The folder T5's tokenizer loads from for a t5xxl file (or a diffusers tokenizer folder); None: none here."""
    source = Path(source)
    candidates = [source] if source.is_dir() else [Path(str(source) + TOKENIZER_SIDECAR), source.parent]
    for folder in candidates:
        if has_tokenizer_files(folder):
            return folder
    cached = hub_cache(T5_HUB_ID)
    return cached if cached is not None and has_tokenizer_files(cached) else None


def hub_cache(repo_id: str) -> Path | None:
    """A hub repository's snapshot in the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or no huggingface_hub
        return None
