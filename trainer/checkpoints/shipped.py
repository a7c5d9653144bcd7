"""Config-only diffusers folders shipped with Nekoya (no weights, no downloads).

``configs/<name>/`` holds the exact JSON configs of the official repositories
plus tokenizer configs. The 49408-token vocabulary is stored once as the BPE
merge list; :func:`shipped_config_dir` copies a folder into the user cache and
writes ``vocab.json``/``merges.txt`` into each tokenizer folder there, once.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from trainer.checkpoints.clip_vocab import real_merges, write_vocab_files

CONFIGS_ROOT = Path(__file__).parent / "configs"

# name -> what it is; the names are also the values of ModelInfo.config_name.
SHIPPED_CONFIGS = {
    "sd15": "Stable Diffusion 1.5 (512 px, epsilon)",
    "sd21_base": "Stable Diffusion 2.x base (512 px, epsilon)",
    "sd21": "Stable Diffusion 2.x 768 (v-prediction)",
    "sdxl_base": "Stable Diffusion XL base 1.0",
}


def cache_root() -> Path:
    """Nekoya's cache folder: $NEKOYA_CACHE_DIR, else $XDG_CACHE_HOME/nekoya, else ~/.cache/nekoya."""
    if os.environ.get("NEKOYA_CACHE_DIR"):
        return Path(os.environ["NEKOYA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nekoya"


def shipped_config_source(name: str) -> Path:
    """The packaged folder (without vocab files); enough to read JSON configs."""
    if name not in SHIPPED_CONFIGS:
        raise KeyError(f"unknown shipped config {name!r}; known: {', '.join(SHIPPED_CONFIGS)}")
    return CONFIGS_ROOT / name


def shipped_config_dir(name: str) -> Path:
    """A complete, loadable config folder for ``name`` (vocab files included)."""
    source = shipped_config_source(name)
    target = cache_root() / "configs" / f"{name}-{_digest(source)}"
    if not (target / "model_index.json").exists():
        _materialise(source, target)
    return target


def read_component_config(config_dir: Path, component: str) -> dict:
    folder = Path(config_dir) / component
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((folder / name).read_text(encoding="utf-8"))


def _digest(folder: Path) -> str:
    """Short hash of the shipped files, so an upgraded Nekoya never reuses stale copies."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.json")):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _materialise(source: Path, target: Path) -> None:
    def fill(staging: Path) -> None:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        for tokenizer_dir in staging.glob("tokenizer*"):
            write_vocab_files(tokenizer_dir, list(real_merges()))

    build_config_folder(target, fill)


def build_config_folder(target: Path, fill) -> None:
    """Build a config folder with ``fill(staging)`` in a sibling temp folder, then rename it to
    ``target``: concurrent processes never see half a folder (a finished twin is kept)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        fill(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "model_index.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
