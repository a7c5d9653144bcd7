"""weighted_captions: (word:1.2), (word), [word] multiply the text encoder's output at those tokens (issue #16)."""
from __future__ import annotations

import pytest
import torch

from trainer.families.prompts import PromptEncoder, parse_prompt_attention, tokenize_weighted


# sd-scripts' parse_prompt_attention docstring examples (library/strategy_base.py, custom_train_functions.py)
@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("", [("", 1.0)]),
    ("[low] (x:0.5) a:b", [("low", 1 / 1.1), (" ", 1.0), ("x", 0.5), (" a:b", 1.0)]),
])
def test_the_parser_matches_sd_scripts(text, expected):
    assert parse_prompt_attention(text) == expected


def _load(path, family_key="sd1"):
    from trainer.families.registry import create_family
    from trainer.settings import TrainingSettings

    settings = TrainingSettings(pretrained_model_name_or_path=str(path), sdxl=family_key == "sdxl",
                                v2=family_key == "sd2")
    family = create_family(settings)
    family.load(settings, torch.float32, torch.device("cpu"), lambda message, level: None)
    return family


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir):
    return _load(tiny_sd1_dir)


@pytest.fixture(scope="module")
def sd2(tiny_sd2_dir):
    return _load(tiny_sd2_dir, "sd2")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return _load(tiny_sdxl_dir, "sdxl")


def _positions(tokenizer, prefix: str, word: str) -> list[int]:
    """Where ``word``'s tokens sit in the conditioning of ``prefix + word + ...`` (BOS is position 0)."""
    start = 1 + len(tokenizer(prefix).input_ids[1:-1]) if prefix else 1
    return list(range(start, start + len(tokenizer(word).input_ids[1:-1])))


@pytest.mark.parametrize("max_token_length", [75, 150])
@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_weighted_ids_are_the_plain_ids_and_weights_mark_the_words(request, name, max_token_length):
    family = request.getfixturevalue(name)
    weighted = ["a photo of (sks dog:1.5) on [grass]", "plain caption"]
    plain = ["a photo of sks dog on grass", "plain caption"]
    ids, weights = family.tokenize_weighted(weighted, max_token_length)
    assert torch.equal(ids, family.tokenize(plain, max_token_length))
    n_chunks = max_token_length // 75
    assert weights.shape == (2, n_chunks * 75 + 2)
    dog = _positions(family.tokenizer, "a photo of ", "sks dog")
    grass = _positions(family.tokenizer, "a photo of sks dog on ", "grass")
    expected = torch.ones(n_chunks * 75 + 2)
    expected[dog] = 1.5
    expected[grass] = 1 / 1.1
    assert torch.allclose(weights[0], expected) and torch.equal(weights[1], torch.ones(n_chunks * 75 + 2))


def test_a_long_caption_is_cut_like_the_plain_one(sd1):
    words = " ".join(f"w{i}" for i in range(200))
    ids, weights = tokenize_weighted(sd1.tokenizer, [f"({words})"], 150)
    assert torch.equal(ids, sd1.tokenize([words], 150))
    assert torch.allclose(weights[0, 1:-1], torch.full((150,), 1.1)) and weights[0, 0] == weights[0, -1] == 1.0


@pytest.mark.parametrize("max_token_length", [75, 150])
@pytest.mark.parametrize("cache_outputs", [False, True])
def test_embeddings_differ_from_plain_ones_only_at_the_weighted_tokens(sd1, max_token_length, cache_outputs):
    weighted = PromptEncoder(sd1, 1, max_token_length, cache_outputs, weighted=True)
    plain = PromptEncoder(sd1, 1, max_token_length, cache_outputs)
    with torch.no_grad():
        got = weighted(["a (sks:2.0) dog", "[a] dog"], False)
        base = plain(["a sks dog", "a dog"], False)
    assert got.shape == base.shape
    ratio = torch.ones(2, got.shape[1])
    ratio[0, _positions(sd1.tokenizer, "a ", "sks")] = 2.0
    ratio[1, _positions(sd1.tokenizer, "", "a")] = 1 / 1.1
    assert torch.allclose(got, base * ratio.unsqueeze(-1), atol=1e-6)
    assert not torch.allclose(got, base)


def test_without_weights_the_weighted_encoder_gives_the_plain_conditioning(sd2):
    captions = ["just words, no brackets", "another one"]
    with torch.no_grad():
        assert torch.allclose(PromptEncoder(sd2, 2, 150, False, weighted=True)(captions, False),
                              PromptEncoder(sd2, 2, 150, False)(captions, False))


def test_sdxl_weights_both_encoders_hidden_states_not_the_pooled_embedding(sdxl):
    with torch.no_grad():
        got = PromptEncoder(sdxl, 0, 75, False, weighted=True)(["a (sks:1.5) dog"], False)
        base = PromptEncoder(sdxl, 0, 75, False)(["a sks dog"], False)
    ratio = torch.ones(1, got.hidden_states.shape[1])
    ratio[0, _positions(sdxl.tokenizers[0], "a ", "sks")] = 1.5
    assert torch.allclose(got.hidden_states, base.hidden_states * ratio.unsqueeze(-1), atol=1e-6)
    assert torch.equal(got.pooled, base.pooled)


def test_the_weights_carry_gradients_to_a_trained_text_encoder(sd1):
    encoder = sd1.text_encoders[0]
    encoder.requires_grad_(True)
    try:
        cond = PromptEncoder(sd1, 1, 75, False, weighted=True)(["a (sks:0.0) dog"], True)
        cond.sum().backward()
        assert any(p.grad is not None for p in encoder.parameters())
    finally:
        encoder.requires_grad_(False)
        encoder.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_a_run_with_weighted_captions_encodes_with_weights(tiny_sd1_dir, tmp_path, monkeypatch):
    from test_train import tiny_settings
    from trainer import run_setup
    from trainer.devtools.synthetic import make_image_folder
    from trainer.loop import train

    images = make_image_folder(tmp_path / "img", {"1_(sks:1.5) dog": 2}, sizes=[(64, 64)], seed=3)
    made = []
    original = run_setup.PromptEncoder

    def recording(*args, **kwargs):
        encoder = original(*args, **kwargs)
        made.append(encoder)
        return encoder

    monkeypatch.setattr(run_setup, "PromptEncoder", recording)
    result = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "out", weighted_captions=True, max_train_steps=1))
    assert result.status == "finished", result.error
    assert [encoder.weighted for encoder in made] == [True]
