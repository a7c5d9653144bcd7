"""The lean CLIP text encoders and tokenizer (trainer.models) against transformers 5's classes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as RefModel
from transformers import CLIPTextModelWithProjection as RefProjection
from transformers import CLIPTokenizer as RefTokenizer

import trainer.models.clip_text as clip_text
from trainer.checkpoints.clip_vocab import write_tokenizer
from trainer.devtools.tiny_specs import TINY_SPECS
from trainer.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from trainer.models.clip_tokenizer import CLIPTokenizer

END, BANG = "<|endoftext|>", "!"
CAPTIONS = [
    "a photo of sks dog, masterpiece",
    "1girl, solo, long hair, (red:1.2), [blue eyes], ((best quality)), <lora:x:0.8>",
    "A Photo Of   SKS\tdog\n\non the BEACH  ",
    "Café naïve résumé, Ærøskøbing, straße, ΟΔΟΣ, İstanbul, e\u0301",
    "日本語のキャプション, 中文, 한국어, emoji 😀🎨👍🏽, ❤️",
    "don't, it's, we're, they've, I'm, we'll, he'd, ''s, DON'T",
    "numbers 1024x768, 3.14, 2023-01-01, #42, 100%, $5, 1st",
    "wow!!! hello! !!",
    "",
    "   ",
    "a <|endoftext|> b <|startoftext|> c <|ENDOFTEXT|>!",
    "no\u00a0break\u3000ideographic\u200bzero-width\x1ccontrol",
    ", ".join(f"tag{i}, long caption word number {i}" for i in range(60)),  # truncates at 77 and 227
]


def _spec(family: str, index: int = 0) -> dict:
    spec = dict(TINY_SPECS[family].text_encoders[index])
    spec.pop("class")
    return spec


# A config closer to a real one: real vocabulary and legacy eos_token_id 2 (the SD configs' value,
# which makes transformers pool at the argmax id), 64-dim heads, LayerNorm eps as shipped.
NEAR_REAL = {
    "vocab_size": 49408, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 96, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
CASES = {  # name -> (config, with projection, tokenizer folder key)
    "sd1": (_spec("sd1"), False, "tiny_end"),
    "sd2": (_spec("sd2"), False, "tiny_bang"),
    "sdxl_te1": (_spec("sdxl", 0), False, "tiny_end"),
    "sdxl_te2": (_spec("sdxl", 1), True, "tiny_bang"),
    "near_real": (NEAR_REAL, False, "real_end"),
    "near_real_proj": (NEAR_REAL, True, "real_bang"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: a second thread only adds sync cost (tenfold on a busy 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_tokenizers")
    return {
        f"{'real' if real else 'tiny'}_{name}": write_tokenizer(root / f"{real}_{name}", real=real, pad_token=pad)
        for real in (False, True)
        for name, pad in (("end", END), ("bang", BANG))
    }


def _pair(case: str):
    config, projection, _ = CASES[case]
    torch.manual_seed(0)
    ref = (RefProjection if projection else RefModel)(CLIPTextConfig(**config)).eval()
    mine = (CLIPTextModelWithProjection if projection else CLIPTextModel).from_config(dict(config)).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    return ref, mine


def _ids(case: str, tokenizer_dirs) -> torch.Tensor:
    tok = RefTokenizer.from_pretrained(tokenizer_dirs[CASES[case][2]])
    return tok(CAPTIONS, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids


# ---- text model ---------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_keys_and_shapes_match(case):
    config, projection, _ = CASES[case]
    ref = (RefProjection if projection else RefModel)(CLIPTextConfig(**config))
    mine = (CLIPTextModelWithProjection if projection else CLIPTextModel).from_config(dict(config))
    ref_sd, my_sd = ref.state_dict(), mine.state_dict()
    assert list(my_sd) == list(ref_sd)  # same keys, same order
    assert {k: v.shape for k, v in my_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    prefix = "text_model." if projection else ""
    assert f"{prefix}embeddings.token_embedding.weight" in my_sd
    assert ("text_projection.weight" in my_sd) == projection


@pytest.mark.parametrize("case", list(CASES))
def test_lora_targets_have_the_reference_paths_and_class_names(case):
    ref, mine = _pair(case)

    def targets(model):
        return [(name, type(m).__name__, sorted(c for c, sub in m.named_children() if isinstance(sub, torch.nn.Linear)))
                for name, m in model.named_modules() if type(m).__name__ in ("CLIPAttention", "CLIPMLP")]

    assert targets(mine) == targets(ref)
    assert targets(mine)[0][2] == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert targets(mine)[1][2] == ["fc1", "fc2"]
    linear = [n for n, m in mine.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linear == [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_transformers(case, tokenizer_dirs):
    ref, mine = _pair(case)
    ids = _ids(case, tokenizer_dirs)
    with torch.no_grad():
        expected = ref(ids, output_hidden_states=True)
        got = mine(ids, output_hidden_states=True)
        plain = mine(ids)
    scale = expected.last_hidden_state.abs().max()
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5 * scale, rtol=1e-5)
    assert len(got.hidden_states) == len(expected.hidden_states) == CASES[case][0]["num_hidden_layers"] + 1
    for mine_state, ref_state in zip(got.hidden_states, expected.hidden_states):
        torch.testing.assert_close(mine_state, ref_state, atol=1e-5 * ref_state.abs().max(), rtol=1e-5)
    assert plain.hidden_states is None
    torch.testing.assert_close(plain.last_hidden_state, got.last_hidden_state)
    if CASES[case][1]:
        torch.testing.assert_close(got.text_embeds, expected.text_embeds, atol=1e-5, rtol=1e-5)
        assert got[0] is got.text_embeds and expected[0].shape == got[0].shape  # transformers' order
        pooled = ref.text_model(ids).pooler_output
    else:
        pooled = expected.pooler_output
        assert got[0] is got.last_hidden_state
    torch.testing.assert_close(got.pooler_output, pooled, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("case", ["sd1", "sdxl_te2", "near_real"])
def test_gradients_match_transformers(case, tokenizer_dirs):
    ref, mine = _pair(case)
    ids = _ids(case, tokenizer_dirs)[:4]
    torch.manual_seed(1)
    weights = None

    def backward(model):
        nonlocal weights
        out = model(ids, output_hidden_states=True)
        first = out.text_embeds if CASES[case][1] else out.pooler_output
        if weights is None:
            weights = [torch.randn_like(out.last_hidden_state), torch.randn_like(first),
                       torch.randn_like(out.hidden_states[-2])]
        loss = ((out.last_hidden_state * weights[0]).sum() + (first * weights[1]).sum()
                + (out.hidden_states[-2] * weights[2]).sum())
        loss.backward()
        return dict(model.named_parameters())

    expected, got = backward(ref), backward(mine)
    _assert_same_gradients(expected, got)


def _assert_same_gradients(expected: dict, got: dict) -> None:
    """Every parameter's gradient within 1e-5 of its own largest value, except the key biases: adding one
    vector to every key shifts each query's scores by a constant, which softmax ignores, so their true
    gradient is 0 and both sides hold rounding noise (~1e-6): those are held to 1e-5 of the largest
    gradient in the model."""
    largest = max(param.grad.abs().max().item() for param in expected.values())
    bad = []
    for name, param in expected.items():
        atol = 1e-5 * (largest if name.endswith("k_proj.bias") else param.grad.abs().max().item()) + 1e-8
        if not torch.allclose(got[name].grad, param.grad, atol=atol, rtol=1e-4):
            bad.append((name, param.grad.abs().max().item(), (got[name].grad - param.grad).abs().max().item()))
    assert not bad, bad


def test_gradient_checkpointing_recomputes_each_layer_in_training_only(tokenizer_dirs, monkeypatch):
    ref, mine = _pair("sdxl_te2")
    ids = _ids("sdxl_te2", tokenizer_dirs)[:4]
    calls = []
    real_checkpoint = clip_text.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(clip_text, "checkpoint", counting)
    mine.gradient_checkpointing_enable()
    assert mine.is_gradient_checkpointing
    mine(ids)
    assert calls == []  # eval mode: no recomputation
    mine.train()
    out = mine(ids, output_hidden_states=True)
    assert calls == [False, False]  # one per layer, non-reentrant
    (out.text_embeds.sum() + out.hidden_states[-2].square().sum()).backward()
    ref_out = ref(ids, output_hidden_states=True)
    (ref_out.text_embeds.sum() + ref_out.hidden_states[-2].square().sum()).backward()
    torch.testing.assert_close(out.text_embeds, ref_out.text_embeds)
    _assert_same_gradients(dict(ref.named_parameters()), dict(mine.named_parameters()))
    mine.gradient_checkpointing_disable()
    assert not mine.is_gradient_checkpointing


def test_api_used_by_the_trainer(tokenizer_dirs):
    _, te = _pair("sd1")
    _, te2 = _pair("sdxl_te2")
    ids = _ids("sd1", tokenizer_dirs)
    # clip skip: the final LayerNorm is where the trainer looks for it
    out = te(ids, output_hidden_states=True)
    norm = getattr(te, "text_model", te).final_layer_norm
    torch.testing.assert_close(norm(out.hidden_states[-1]), out.last_hidden_state)
    assert getattr(te2, "text_model", te2).final_layer_norm is te2.text_model.final_layer_norm
    assert te(ids)[0].shape == (len(CAPTIONS), 77, 32)
    assert te(ids)["last_hidden_state"] is not None
    assert te2.text_projection.weight.shape == (64, 64)
    assert te.get_input_embeddings() is te.embeddings.token_embedding
    assert te2.get_input_embeddings() is te2.text_model.embeddings.token_embedding
    assert (te.dtype, te.device) == (torch.float32, torch.device("cpu"))
    te2.to(torch.bfloat16)
    assert te2.dtype == torch.bfloat16 and te2(ids).text_embeds.dtype == torch.bfloat16
    # the config is a namespace with transformers' defaults filled in
    assert te.config.hidden_act == "quick_gelu" and te.config.initializer_factor == 1.0
    assert CLIPTextModel.from_config({}).config.hidden_size == 512
    # 3-d ids: flattened like transformers
    assert te(ids[None]).last_hidden_state.shape == (len(CAPTIONS), 77, 32)


def test_builds_on_the_meta_device_and_loads_with_assign():
    ref = RefModel(CLIPTextConfig(**_spec("sd1")))
    with torch.device("meta"):
        mine = CLIPTextModel.from_config(_spec("sd1"))
    mine.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert mine.device == torch.device("cpu")
    ids = torch.tensor([[521, 5, 6, 522, 522]])
    torch.testing.assert_close(mine(ids).last_hidden_state, ref(ids).last_hidden_state)


@pytest.mark.parametrize(("key", "value"), [("hidden_act", "relu"), ("attention_dropout", 0.1),
                                            ("num_attention_heads", 5), ("eos_token_id", [2, 3])])
def test_unsupported_configs_are_refused(key, value):
    with pytest.raises(ValueError, match=f"config: {key}="):
        CLIPTextModel.from_config({**_spec("sd1"), key: value})


@pytest.mark.slow
def test_modules_import_no_model_library():
    code = ("import sys, trainer.models.clip_text, trainer.models.clip_tokenizer; "
            "bad = {'diffusers', 'transformers', 'peft', 'accelerate', 'huggingface_hub'} & "
            "{m.split('.')[0] for m in sys.modules}; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- tokenizer ----------------------------------------------------------------------

@pytest.mark.parametrize("key", ["tiny_end", "tiny_bang", "real_end", "real_bang"])
def test_tokenizer_ids_match_transformers(key, tokenizer_dirs):
    ref = RefTokenizer.from_pretrained(tokenizer_dirs[key])
    mine = CLIPTokenizer.from_pretrained(tokenizer_dirs[key])
    for name in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "model_max_length"):
        assert getattr(mine, name) == getattr(ref, name), name
    assert mine.pad_token_id == (ref.convert_tokens_to_ids(BANG) if key.endswith("bang") else mine.eos_token_id)
    for max_length in (77, 227):
        kwargs = dict(padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        got, expected = mine(CAPTIONS, **kwargs), ref(CAPTIONS, **kwargs)
        assert got.input_ids.dtype == torch.long and got.input_ids.shape == (len(CAPTIONS), max_length)
        assert torch.equal(got.input_ids, expected.input_ids)
        assert torch.equal(got.attention_mask, expected.attention_mask)
    for caption in CAPTIONS:
        assert mine.tokenize(caption) == ref.tokenize(caption), caption
        assert mine(caption).input_ids == ref(caption).input_ids, caption
    longest = mine(CAPTIONS[:3], padding=True)
    assert longest.input_ids == ref(CAPTIONS[:3], padding=True).input_ids
    assert mine(CAPTIONS[:3], padding=True, return_tensors="pt").input_ids.shape[1] == len(longest.input_ids[0])
    ids = ref(CAPTIONS[4]).input_ids
    assert mine.decode(ids) == ref.decode(ids)
    assert mine.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_tokenizer_known_ids_of_the_real_vocabulary(tokenizer_dirs):
    mine = CLIPTokenizer.from_pretrained(tokenizer_dirs["real_end"])
    assert mine("a photo of sks dog, masterpiece").input_ids == [49406, 320, 1125, 539, 48136, 1929, 267, 12066, 49407]
    assert len(mine) == 49408


def test_tokenizer_save_pretrained_round_trips_through_transformers(tokenizer_dirs, tmp_path):
    for key in ("tiny_bang", "real_end"):
        mine = CLIPTokenizer.from_pretrained(tokenizer_dirs[key])
        mine.save_pretrained(tmp_path / key)
        assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= {
            p.name for p in (tmp_path / key).iterdir()}
        ref = RefTokenizer.from_pretrained(tmp_path / key)
        again = CLIPTokenizer.from_pretrained(tmp_path / key)
        kwargs = dict(padding="max_length", truncation=True, max_length=77)
        expected = RefTokenizer.from_pretrained(tokenizer_dirs[key])(CAPTIONS, **kwargs).input_ids
        assert ref(CAPTIONS, **kwargs).input_ids == expected
        assert again(CAPTIONS, **kwargs).input_ids == expected
        assert (ref.pad_token, ref.model_max_length) == (mine.pad_token, mine.model_max_length)


def test_tokenizer_reads_folders_transformers_writes_or_hubs_ship(tokenizer_dirs, tmp_path):
    # transformers 5's save_pretrained: tokenizer.json + tokenizer_config.json only
    RefTokenizer.from_pretrained(tokenizer_dirs["real_bang"]).save_pretrained(tmp_path / "v5")
    assert not (tmp_path / "v5" / "vocab.json").exists()
    ref = RefTokenizer.from_pretrained(tokenizer_dirs["real_bang"])
    mine = CLIPTokenizer.from_pretrained(tmp_path / "v5")
    assert mine(CAPTIONS, padding="max_length", truncation=True).input_ids == ref(
        CAPTIONS, padding="max_length", truncation=True).input_ids
    # hub-style dict tokens, no tokenizer_config.json: special_tokens_map.json decides, no max length
    folder = write_tokenizer(tmp_path / "hub", real=False, pad_token=BANG)
    (folder / "tokenizer_config.json").unlink()
    token = {"content": END, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": token, "pad_token": BANG}))
    ref, mine = RefTokenizer.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder)
    assert (mine.pad_token_id, mine.eos_token_id, mine.model_max_length) == (
        ref.pad_token_id, ref.eos_token_id, ref.model_max_length)
    assert mine(CAPTIONS).input_ids == ref(CAPTIONS).input_ids
    # no model_max_length: "max_length" padding without a length pads nothing, as in transformers
    assert mine(CAPTIONS[0], padding="max_length", truncation=True).input_ids == ref(CAPTIONS[0]).input_ids
    assert CLIPTokenizer.from_pretrained(tmp_path, subfolder="hub").pad_token == BANG
