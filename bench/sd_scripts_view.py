"""Give sd-scripts a view of a benchmark model folder it can load (same weights, older layouts).

    python bench/sd_scripts_view.py /tmp/nekoya-bench/model-tiny /tmp/sdbench/model-tiny /tmp/sdbench/tok-tiny --vocab tiny
    python bench/sd_scripts_view.py /tmp/nekoya-bench/model-sd15 /tmp/sdbench/model-sd15 /tmp/sdbench/tok-sd15 --vocab real

sd-scripts pins transformers 4.44. The folders ``bench/train_speed.py`` builds are written by
transformers 5, which saves the CLIP text encoder without the ``text_model.`` key prefix and the
tokenizer as tokenizer.json only. This writes a folder where the U-Net, VAE and scheduler are
symlinks, the text encoder is the same tensors with the prefix transformers 4 expects, and the
tokenizer is vocab.json + merges.txt under ``<tok_root>/openai_clip-vit-large-patch14``, the name
sd-scripts looks up with ``--tokenizer_cache_dir`` (so it never goes to the hub). Run with Nekoya's venv.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LINKED = ("unet", "vae", "scheduler", "model_index.json")
TOKENIZER_NAME = "openai_clip-vit-large-patch14"  # sd-scripts: model_id.replace("/", "_")


def make_view(source: Path, view: Path, tokenizer_root: Path, real_vocab: bool) -> dict:
    from safetensors.torch import load_file, save_file

    from trainer.checkpoints.clip_vocab import write_tokenizer

    view.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = view / name
        if not link.exists():
            link.symlink_to(source / name)
    text_encoder = view / "text_encoder"
    text_encoder.mkdir(exist_ok=True)
    shutil.copy(source / "text_encoder" / "config.json", text_encoder / "config.json")
    tensors = load_file(source / "text_encoder" / "model.safetensors")
    tensors = {key if key.startswith("text_model.") else "text_model." + key: value for key, value in tensors.items()}
    save_file(tensors, text_encoder / "model.safetensors", metadata={"format": "pt"})
    tokenizer = tokenizer_root / TOKENIZER_NAME
    if tokenizer.exists():
        shutil.rmtree(tokenizer)
    write_tokenizer(tokenizer, real=real_vocab)
    if not (view / "tokenizer").exists():
        (view / "tokenizer").symlink_to(tokenizer)
    return {"view": str(view), "tokenizer": str(tokenizer), "text_encoder_tensors": len(tensors)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="a model folder built by bench/train_speed.py")
    p.add_argument("view", type=Path, help="folder to write the sd-scripts view into")
    p.add_argument("tokenizer_root", type=Path, help="pass this as sd-scripts' --tokenizer_cache_dir")
    p.add_argument("--vocab", choices=("tiny", "real"), required=True, help="tiny for --size tiny, real for sd15")
    args = p.parse_args(argv)
    print(json.dumps(make_view(args.source, args.view, args.tokenizer_root, args.vocab == "real")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
