"""LyCORIS files in the tools and Try it: inspect/verify name the type, merge adds each module's own weight
change, Try it applies it at the chosen weight, resize and extract refuse by name. The files are trained for one
step on the tiny SD1 model (then made stronger), and the reference is LyCORIS's own module forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from test_tools_support import components, one_thread, text_outputs, unet_output  # noqa: F401  (one_thread: a fixture)
from test_train import images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer.checkpoints import load_pipeline_components
from trainer.cli import main
from trainer.tools import ToolError, extract_lora, inspect_lora, merge_into_checkpoint, read_lora, resize_lora, \
    verify_lora
from trainer.tools.layer_index import model_layers
from trainer.tools.lycoris_file import parse_lycoris, rebuild, weight_delta

# kohya_ss's type -> the type the tools name; every module of the file is LyCORIS's own (not lora_down/lora_up)
OWN_DELTA_TYPES = {
    "LyCORIS/LoHa": "LoHa", "LyCORIS/LoKr": "LoKr", "LyCORIS/iA3": "iA3", "LyCORIS/Diag-OFT": "Diag-OFT",
    "LyCORIS/BOFT": "BOFT", "LyCORIS/GLoRA": "GLoRA", "LyCORIS/Native Fine-Tuning": "Native Fine-Tuning",
}
# these write lora_down/lora_up: plain LoRA modules to the tools
LORA_LAYOUT_TYPES = {"LyCORIS/LoCon": "LoCon", "LyCORIS/DyLoRA": "DyLoRA"}
RATIO = 0.7
# what the summary says of the ranks (network_dim 4, alpha 2; conv_dim 2, alpha 1)
SUMMARY_RANKS = {
    "LoHa": "LoHa rank 2 alpha 1 ×20; LoHa rank 4 alpha 2 ×75", "LoKr": "LoKr rank 4 alpha 2",
    "GLoRA": "GLoRA rank 2 alpha 1 ×20; GLoRA rank 4 alpha 2 ×75", "Diag-OFT": "Diag-OFT block size 4 constraint 0",
    "BOFT": "BOFT block size 4 constraint 0", "iA3": "iA3 ×95", "Native Fine-Tuning": "Native Fine-Tuning ×95",
    "LoCon": "rank 4 alpha 2 ×", "DyLoRA": "rank 4 alpha 2 ×",
}


def _strengthened(path, seed: int) -> str:
    """The file with noise added to its factors: one training step leaves LoHa's and iA3's changes near zero."""
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(path))
    for key, value in tensors.items():
        if value.is_floating_point() and value.dim() and not key.endswith((".alpha", ".on_input")):
            tensors[key] = value + torch.randn(value.shape, generator=generator) * 0.1
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path), metadata)
    return str(path)


@pytest.fixture(scope="module")
def lycoris_files(tiny_sd1_dir, images, tmp_path_factory):  # noqa: F811
    """kohya_ss type -> a LyCORIS file trained for one step on the tiny SD1 model (alpha != rank)."""
    from trainer.loop import train

    out, files = tmp_path_factory.mktemp("lycoris_files"), {}
    for seed, lora_type in enumerate({**OWN_DELTA_TYPES, **LORA_LAYOUT_TYPES}):
        # BOFT factors each layer size into blocks: the tiny text encoder's odd MLP width (37) has none
        settings = tiny_settings(tiny_sd1_dir, images, out / str(seed), LoRA_type=lora_type, network_alpha=2,
                                 conv_dim=2, conv_alpha=1, max_train_steps=1,
                                 text_encoder_lr=0.0 if lora_type == "LyCORIS/BOFT" else 1e-3)
        result = train(settings)
        assert result.status == "finished", result.error
        files[lora_type] = _strengthened(result.files[-1], seed)
    return files


def _apply_with_lycoris(family_key, unet, text_encoders, lora, multiplier):
    """LyCORIS's own modules on the models' layers, applied by LyCORIS (its forward is the reference)."""
    index = model_layers(family_key, unet, text_encoders)
    applied = []
    for name, weights in lora.lycoris.items():
        module = rebuild(weights, index.find(name).module)
        module.multiplier = multiplier
        module.apply_to()
        applied.append(module)
    return applied


def _restore(modules):
    for module in reversed(modules):
        module.restore()


# ---- inspect and verify ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("lora_type", sorted({**OWN_DELTA_TYPES, **LORA_LAYOUT_TYPES}))
def test_inspect_names_the_type_and_verify_matches_every_module(lora_type, lycoris_files, tiny_sd1_dir):
    path = lycoris_files[lora_type]
    report = inspect_lora(path)
    type_name = {**OWN_DELTA_TYPES, **LORA_LAYOUT_TYPES}[lora_type]
    assert report.file_type == f"LyCORIS {type_name}" and report.problems == []
    assert report.summary().startswith(f"LyCORIS {type_name}, {len(report.modules)} modules (")
    if lora_type in OWN_DELTA_TYPES:
        assert report.types == {type_name: len(report.modules)}
    assert SUMMARY_RANKS[type_name] in report.summary(), report.summary()
    match = verify_lora(path, tiny_sd1_dir)
    assert match.ok and match.matched == len(report.modules), match.format()
    assert match.matched_by_alias == 0  # conv_in, time_embedding...: found by their own name


@pytest.mark.slow
def test_cli_inspect_of_a_lycoris_file_with_a_base_model_exits_0(lycoris_files, tiny_sd1_dir, capsys):
    path = lycoris_files["LyCORIS/LoHa"]
    assert main(["lora", "inspect", path, "--base", str(tiny_sd1_dir), "--modules"]) == 0
    out = capsys.readouterr().out
    assert "LyCORIS LoHa, 95 modules" in out and "OK: 95 of 95 modules match" in out
    assert "lora_unet_conv_in  LoHa r2 a1 nan" in out


def test_incomplete_and_misfitting_lycoris_modules_are_problems(tmp_path):
    tensors = {
        "lora_unet_a_to_q.hada_w1_a": torch.randn(8, 2), "lora_unet_a_to_q.hada_w1_b": torch.randn(2, 8),
        "lora_unet_a_to_q.hada_w2_a": torch.randn(8, 2), "lora_unet_a_to_q.hada_w2_b": torch.randn(2, 8),
        "lora_unet_a_to_q.alpha": torch.tensor(1.0),
        "lora_unet_b_to_k.hada_w1_a": torch.randn(8, 2),  # the other three factors missing
        "lora_unet_c_to_v.lokr_w1": torch.randn(2, 2), "lora_unet_c_to_v.lokr_w2_a": torch.randn(4, 2),
        "lora_unet_c_to_v.lokr_w2_b": torch.randn(3, 4),  # rank 2 vs 3
        "lora_unet_d_to_out_0.oft_blocks": torch.randn(2, 4, 4),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    lora = read_lora(path)
    assert set(lora.lycoris) == {"lora_unet_a_to_q", "lora_unet_d_to_out_0"} and not lora.modules
    assert lora.lycoris["lora_unet_a_to_q"].rank == 2 and lora.lycoris["lora_unet_d_to_out_0"].type == "Diag-OFT"
    text = "\n".join(lora.problems)
    assert "lora_unet_b_to_k: LyCORIS LoHa module without hada_w1_b, hada_w2_a, hada_w2_b" in text
    assert "lora_unet_c_to_v: its LyCORIS LoKr tensors do not fit together" in text
    assert lora.type_label() == "LyCORIS Diag-OFT/LoHa"


# ---- the weight change -------------------------------------------------------------------------------

@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
@pytest.mark.parametrize("layer", [nn.Linear(64, 96), nn.Conv2d(64, 96, 3, padding=1)], ids=["linear", "conv"])
def test_weight_delta_is_what_the_lycoris_forward_adds(algo, dora, layer):
    """At alpha != rank. (LyCORIS 4.1.3's get_diff_weight for LoHa/LoKr applies alpha/rank twice.)"""
    from lycoris.modules import LoConModule, LohaModule, LokrModule

    module_class = {"locon": LoConModule, "loha": LohaModule, "lokr": LokrModule}[algo]
    torch.manual_seed(0)
    extra = {"factor": 4, "decompose_both": True} if algo == "lokr" else {}
    module = module_class("x", layer, 1.0, 4, 2, weight_decompose=dora, **extra).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    x = torch.randn(2, 64) if isinstance(layer, nn.Linear) else torch.randn(2, 64, 5, 5)
    with torch.no_grad():
        base = layer(x)
        module.multiplier = RATIO
        module.apply_to()
        expected = layer(x) - base
        module.restore()
        delta, bias = weight_delta(module, RATIO)
    assert bias is None and delta.shape == layer.weight.shape
    torch.testing.assert_close(module.op(x, delta, None, **module.kw_dict), expected, rtol=1e-4, atol=1e-5)


def test_lokr_conv_module_with_a_decomposed_w2_is_rebuilt_as_trained():
    """LyCORIS 4.1.3's own loader misreads the layer's input width here (conv_in of the tiny UNet)."""
    from lycoris.modules import LokrModule

    torch.manual_seed(0)
    trained = LokrModule("lora_unet_conv_in", nn.Conv2d(4, 32, 3, padding=1), 1.0, 2, 1).eval()
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    parts = {key: value.detach().clone() for key, value in trained.custom_state_dict().items()}
    assert "lokr_w2_b" in parts and "lokr_w1" in parts
    layer = nn.Conv2d(4, 32, 3, padding=1)
    rebuilt = rebuild(parse_lycoris("lora_unet_conv_in", parts), layer)
    with torch.no_grad():
        expected = trained.get_weight(trained.shape) * RATIO
    torch.testing.assert_close(weight_delta(rebuilt, RATIO)[0], expected)


# ---- merge -----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("lora_type", sorted(OWN_DELTA_TYPES))
def test_merge_equals_the_base_with_lycoris_applying_the_file(lora_type, lycoris_files, tiny_sd1_dir, tmp_path,
                                                               one_thread):  # noqa: F811
    path = lycoris_files[lora_type]
    result = merge_into_checkpoint(tiny_sd1_dir, [(path, RATIO)], tmp_path / "merged.safetensors")
    lora = read_lora(path)
    assert result.loras[0].merged == len(lora.lycoris) and not result.loras[0].unmatched
    merged = load_pipeline_components(result.out_path)
    base = load_pipeline_components(tiny_sd1_dir)  # a copy of its own: LyCORIS hooks it
    plain = unet_output(base.unet)
    applied = _apply_with_lycoris(base.family, base.unet, base.text_encoders, lora, RATIO)
    try:
        expected_unet, expected_text = unet_output(base.unet), text_outputs(base)
    finally:
        _restore(applied)
    merged_unet = unet_output(merged.unet)
    assert (merged_unet - plain).abs().max() > 1e-3
    torch.testing.assert_close(merged_unet, expected_unet, rtol=1e-4, atol=5e-5)
    for got, expected in zip(text_outputs(merged), expected_text, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=5e-5)


@pytest.mark.slow
def test_merged_weight_is_the_base_plus_each_module_s_delta(lycoris_files, tiny_sd1_dir, tmp_path):
    path = lycoris_files["LyCORIS/LoKr"]
    result = merge_into_checkpoint(tiny_sd1_dir, [(path, RATIO)], tmp_path / "merged.safetensors")
    merged = load_pipeline_components(result.out_path)
    base = components(tiny_sd1_dir)
    merged_layers = model_layers(merged.family, merged.unet, merged.text_encoders)
    base_layers = model_layers(base.family, base.unet, base.text_encoders)
    for name, weights in read_lora(path).lycoris.items():
        layer = base_layers.find(name).module
        delta, _ = weight_delta(rebuild(weights, layer), RATIO)
        torch.testing.assert_close(merged_layers.find(name).module.weight, layer.weight + delta, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("lora_type", sorted(LORA_LAYOUT_TYPES))
def test_locon_and_dylora_files_merge_every_module(lora_type, lycoris_files, tiny_sd1_dir, tmp_path):
    """Their preset's layers outside the trainer's targets (conv_in, time_embedding...) are found by name."""
    path = lycoris_files[lora_type]
    result = merge_into_checkpoint(tiny_sd1_dir, [(path, RATIO)], tmp_path / "merged.safetensors")
    assert result.loras[0].merged == len(read_lora(path).modules) == 95


@pytest.mark.slow
def test_sdxl_loha_file_verifies_merges_and_applies_on_sgm_names(tiny_sdxl_dir, images, tmp_path,  # noqa: F811
                                                                  one_thread):  # noqa: F811
    from trainer.loop import train

    settings = tiny_settings(tiny_sdxl_dir, images, tmp_path / "out", LoRA_type="LyCORIS/LoHa", sdxl=True,
                             network_alpha=2, conv_dim=2, conv_alpha=1, max_train_steps=1)
    result = train(settings)
    assert result.status == "finished", result.error
    path = _strengthened(result.files[-1], 0)
    lora = read_lora(path)
    assert verify_lora(path, tiny_sdxl_dir).ok
    merged_file = merge_into_checkpoint(tiny_sdxl_dir, [(path, RATIO)], tmp_path / "merged.safetensors")
    assert merged_file.loras[0].merged == len(lora.lycoris)
    merged = load_pipeline_components(merged_file.out_path)
    base = load_pipeline_components(tiny_sdxl_dir)
    applied = _apply_with_lycoris(base.family, base.unet, base.text_encoders, lora, RATIO)
    try:
        expected = unet_output(base.unet)
    finally:
        _restore(applied)
    torch.testing.assert_close(unet_output(merged.unet), expected, rtol=1e-4, atol=5e-5)


# ---- Try it -----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("lora_type", sorted(OWN_DELTA_TYPES))
def test_try_it_applies_the_file_as_lycoris_does_at_the_chosen_weight(lora_type, lycoris_files, tiny_sd1_dir):
    from test_tryit import gen_request, pixels
    from trainer.inference import LoraChoice, TryIt
    from trainer.inference.lora_apply import build_lora

    path = lycoris_files[lora_type]
    tryit = TryIt(device="cpu")
    model = tryit.load(str(tiny_sd1_dir))
    family = model.family
    applied = build_lora(path, model.family_key, family, torch.device("cpu"), torch.float32)
    assert applied.matched == len(read_lora(path).lycoris) and not applied.notes()
    plain = unet_output(family.unet)
    applied.network.set_multiplier(RATIO)
    applied.network.apply_to()
    try:
        ours = unet_output(family.unet)
    finally:
        applied.network.restore()
    direct = _apply_with_lycoris(model.family_key, family.unet, family.text_encoders, read_lora(path), RATIO)
    try:
        expected = unet_output(family.unet)
    finally:
        _restore(direct)
    assert (ours - plain).abs().max() > 1e-3
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(unet_output(family.unet), plain, rtol=0, atol=0)  # removed cleanly
    base, weighted = tryit.compare(gen_request(tiny_sd1_dir), [LoraChoice(None), LoraChoice(path, 1.0)])
    assert np.abs(pixels(weighted[0]) - pixels(base[0])).mean() > 0.5


# ---- resize and extract say which types they handle ---------------------------------------------------------

@pytest.mark.slow
def test_resize_refuses_a_lycoris_file_by_name_and_type(lycoris_files, tmp_path, capsys):
    path = lycoris_files["LyCORIS/LoHa"]
    name = path.rsplit("/", 1)[-1]
    with pytest.raises(ToolError, match=rf"^{name}: resize handles LoRA/LoCon files \(lora_down/lora_up\); this is a "
                                        "LyCORIS LoHa file"):
        resize_lora(path, tmp_path / "small.safetensors", 2)
    assert main(["lora", "resize", path, "-o", str(tmp_path / "small.safetensors"), "--rank", "2"]) == 1
    err = capsys.readouterr().err
    assert "this is a LyCORIS LoHa file" in err and "Traceback" not in err
    assert not (tmp_path / "small.safetensors").exists()
    resized = resize_lora(lycoris_files["LyCORIS/DyLoRA"], tmp_path / "dylora.safetensors", 2)  # lora_down/up
    assert len(resized.modules) == 95


@pytest.mark.slow
def test_extract_refuses_a_lycoris_file_given_as_a_model(lycoris_files, tiny_sd1_file, tmp_path):
    path = lycoris_files["LyCORIS/LoKr"]
    with pytest.raises(ToolError, match="is a LyCORIS LoKr file, not a model: extract takes two full models .* "
                                        r"writes a LoRA/LoCon file \(lora_down/lora_up\)"):
        extract_lora(tiny_sd1_file, path, tmp_path / "x.safetensors")


def test_parse_lycoris_names_an_unknown_part():
    parts = {"hada_w1_a": torch.randn(8, 2), "hada_w1_b": torch.randn(2, 8), "hada_w2_a": torch.randn(8, 2),
             "hada_w2_b": torch.randn(2, 8), "lora_A.weight": torch.randn(2, 8)}
    assert "parts LyCORIS does not know (lora_A.weight)" in parse_lycoris("lora_unet_x", parts)


def test_the_metadata_names_kohya_s_own_loha_and_resize_refuses_it(tmp_path):
    tensors = {"lora_unet_a_to_q.hada_w1_a": torch.randn(8, 2), "lora_unet_a_to_q.hada_w1_b": torch.randn(2, 8),
               "lora_unet_a_to_q.hada_w2_a": torch.randn(8, 2), "lora_unet_a_to_q.hada_w2_b": torch.randn(2, 8),
               "lora_unet_a_to_q.alpha": torch.tensor(1.0)}
    path = tmp_path / "kohya_loha.safetensors"
    save_file(tensors, str(path), {"ss_network_module": "networks.loha"})
    report = inspect_lora(path)
    assert report.file_type == "Kohya LoHa" and report.summary().startswith("Kohya LoHa, 1 modules (1 UNet)")
    with pytest.raises(ToolError, match="this is a Kohya LoHa file"):
        resize_lora(path, tmp_path / "small.safetensors", 1)
