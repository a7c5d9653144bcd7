"""Tests for trainer.devtools.synthetic: tiny models and image folders."""
from __future__ import annotations

import json

import pytest


def _load(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, local_files_only=True)


@pytest.mark.slow
def test_tiny_sd1_folder_loads_and_generates(tiny_sd1_dir):
    import torch

    index = json.loads((tiny_sd1_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = _load(tiny_sd1_dir)
    assert tuple(pipe.unet.config.block_out_channels) == (32, 64)
    assert sum(p.numel() for p in pipe.unet.parameters()) < 2_000_000
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer.model_max_length == 77
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == 523
    image = pipe(
        "a photo of sks dog", num_inference_steps=2, height=64, width=64,
        output_type="np", generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3)


def test_tiny_tokenizer_encodes_any_text(tiny_sd1_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd1_dir / "tokenizer")
    ids = tok("a photo of sks dog, Zürich 東京").input_ids
    assert ids[0] == tok.bos_token_id == 521 and ids[-1] == tok.eos_token_id == 522
    assert tok.convert_ids_to_tokens(ids[1:6]) == ["a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>"]
    assert tok.unk_token_id not in ids[1:-1]


def test_same_seed_same_weights_different_seed_different(tmp_path):
    from safetensors.torch import load_file
    from trainer.devtools.synthetic import build_tiny_pipeline

    weights = "unet/diffusion_pytorch_model.safetensors"
    a = load_file(build_tiny_pipeline(tmp_path / "a", seed=3) / weights)
    b = load_file(build_tiny_pipeline(tmp_path / "b", seed=3) / weights)
    c = load_file(build_tiny_pipeline(tmp_path / "c", seed=4) / weights)
    key = "conv_in.weight"
    assert a[key].equal(b[key])
    assert not a[key].equal(c[key])


def test_unknown_family_or_size_is_rejected(tmp_path):
    from trainer.devtools.synthetic import build_tiny_pipeline

    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_pipeline(tmp_path / "x", family="sd3")
    with pytest.raises(ValueError, match="not available"):
        build_tiny_pipeline(tmp_path / "y", family="sdxl", size="sd15")


# ---- image folders -----------------------------------------------------------------

def test_image_folder_layout_and_captions(image_folder):
    from PIL import Image

    dog = image_folder / "10_sks dog"
    images = sorted(p for p in dog.iterdir() if p.suffix in {".png", ".jpg"})
    assert len(images) == 4 and {p.suffix for p in images} == {".png", ".jpg"}
    assert len(list((image_folder / "5_cat").glob("*.txt"))) == 3
    sizes = {Image.open(p).size for p in images}
    assert sizes == {(64, 64), (96, 64), (64, 96)}
    caption = images[0].with_suffix(".txt").read_text()
    assert caption.startswith("sks dog, ") and "background" in caption


def test_image_folder_caption_modes(tmp_path):
    from trainer.devtools.synthetic import make_image_folder

    some = make_image_folder(tmp_path / "some", {"2_x": 4}, captions="some", caption_extension=".caption")
    assert sorted(p.name for p in (some / "2_x").glob("*.caption")) == ["000.caption", "002.caption"]
    none = make_image_folder(tmp_path / "none", {"2_x": 3}, captions=False)
    assert not list((none / "2_x").glob("*.txt"))
    with pytest.raises(ValueError):
        make_image_folder(tmp_path / "bad", captions="all")


def test_image_folder_is_deterministic(tmp_path):
    from trainer.devtools.synthetic import make_image_folder

    a = make_image_folder(tmp_path / "a", {"1_a": 3}, seed=7)
    b = make_image_folder(tmp_path / "b", {"1_a": 3}, seed=7)
    for path in sorted((a / "1_a").iterdir()):
        assert path.read_bytes() == (b / "1_a" / path.name).read_bytes()


def test_corrupt_and_tiny_images(tmp_path):
    from PIL import Image, UnidentifiedImageError
    from trainer.devtools.synthetic import add_corrupt_image, add_tiny_image

    corrupt = add_corrupt_image(tmp_path)
    with pytest.raises(UnidentifiedImageError):
        Image.open(corrupt).load()
    tiny = add_tiny_image(tmp_path, size=(8, 6))
    assert Image.open(tiny).size == (8, 6)
    assert tiny.with_suffix(".txt").exists()
