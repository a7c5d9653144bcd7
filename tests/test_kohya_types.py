"""kohya_ss's own LoRA types: Kohya LoHa / Kohya LoKr (sd-scripts' networks.loha / networks.lokr), Kohya DyLoRA
(networks.dylora) and LoRA-FA (networks.lora_fa) train and write the files sd-scripts writes.

The facts below are sd-scripts' (networks/loha.py, lokr.py, network_base.py, dylora.py, lora_fa.py), written out here
so that a change of Nekoya's modules that departs from them fails."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from test_train import images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer.loop import train
from trainer.network.dylora import DyLoRAModule
from trainer.network.kohya_loha_lokr import KohyaLoHaModule, KohyaLoKrModule, factorization
from trainer.network.lora_fa import LoRAFAModule
from trainer.preflight import check

# sd-scripts' target rules for these networks (network_base.ArchConfig for SDXL; dylora.py and lora_fa.py's lists)
UNET_CLASSES = ("Transformer2DModel",)
UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def _file(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _sd_scripts_layers(settings, conv: bool) -> dict[str, nn.Module]:
    """kohya key name -> layer, by sd-scripts' rule: every Linear and Conv2d inside a module of a target class
    (3x3 convs only with conv_dim), named ``<prefix>.<module path>.<child path>`` with dots as underscores. The
    roots and prefixes are the family's naming views (SDXL: the SGM UNet, lora_te1/lora_te2)."""
    from trainer.families.registry import create_family

    family = create_family(settings)
    family.load(settings, torch.float32, torch.device("cpu"), lambda *a, **k: None)
    layers = {}
    for target in family.lora_targets():
        classes = (UNET_CLASSES + (UNET_CONV_CLASSES if conv else ())) if target.prefix == "lora_unet" else TE_CLASSES
        for path, module in target.root.named_modules():
            if type(module).__name__ not in classes:
                continue
            for child_path, child in module.named_modules():
                if type(child).__name__ == "Linear" or (type(child).__name__ == "Conv2d" and
                                                        (conv or child.kernel_size == (1, 1))):
                    name = f"{target.prefix}.{target.path_prefix}{path}.{child_path}".replace(".", "_")
                    layers[name] = child
    return layers


def _kohya_ss_args(text: str) -> dict[str, str]:
    """kohya_ss's network_args string, split as sd-scripts splits it into ss_network_args."""
    return dict(arg.split("=", 1) for arg in text.split())


def _randomised(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    module.train(False)
    return module


# ---- sd-scripts' shapes, initialisation and ΔW, on a Linear and a 3x3 conv ----------------------------------------

LINEAR = nn.Linear(64, 48)
CONV = nn.Conv2d(32, 24, 3, padding=1)


def _output_change(module, layer, x):
    module.apply_to()
    try:
        with torch.no_grad():
            return layer(x) - module._org_forward(x)
    finally:
        module.restore()


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_shapes_init_and_delta_are_sd_scripts(tucker):
    r, alpha = 4, 2.0
    linear = KohyaLoHaModule("lin", LINEAR, r, alpha, use_tucker=tucker)
    shapes = {n: tuple(p.shape) for n, p in linear.named_parameters()}
    assert shapes == {"hada_w1_a": (48, r), "hada_w1_b": (r, 64), "hada_w2_a": (48, r), "hada_w2_b": (r, 64)}
    # w2_a = 0: ΔW = 0 at the start
    assert not linear.hada_w2_a.any() and linear.hada_w1_a.std().item() == pytest.approx(0.1, rel=0.3)
    assert float(linear.alpha) == alpha
    conv = KohyaLoHaModule("conv", CONV, r, alpha, use_tucker=tucker)
    shapes = {n: tuple(p.shape) for n, p in conv.named_parameters()}
    if tucker:  # core (rank, rank, k, k), w_a (rank, out), w_b (rank, in); w1_a = 0
        assert shapes == {"hada_t1": (r, r, 3, 3), "hada_w1_a": (r, 24), "hada_w1_b": (r, 32),
                          "hada_t2": (r, r, 3, 3), "hada_w2_a": (r, 24), "hada_w2_b": (r, 32)}
        assert not conv.hada_w1_a.any()
    else:  # the kernel flattened into the input side
        assert shapes == {"hada_w1_a": (24, r), "hada_w1_b": (r, 32 * 9), "hada_w2_a": (24, r),
                          "hada_w2_b": (r, 32 * 9)}
        assert not conv.hada_w2_a.any()
    # ΔW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank (Tucker: each factor rebuilt from its core first)
    _randomised(linear), _randomised(conv)
    w = {n: p.detach() for n, p in linear.named_parameters()}
    delta = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * alpha / r
    x = torch.randn(3, 64)
    torch.testing.assert_close(_output_change(linear, LINEAR, x), x @ delta.T)
    w = {n: p.detach() for n, p in conv.named_parameters()}
    if tucker:
        def rebuild(t, wa, wb):
            return torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb)
        delta = rebuild(w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"]) * rebuild(w["hada_t2"], w["hada_w2_a"],
                                                                               w["hada_w2_b"]) * alpha / r
    else:
        delta = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
        delta = delta.reshape(24, 32, 3, 3) * alpha / r
    x = torch.randn(2, 32, 6, 6)
    torch.testing.assert_close(_output_change(conv, CONV, x), F.conv2d(x, delta, padding=1), rtol=1e-4, atol=1e-4)


def test_lokr_factorization_is_sd_scripts():
    # sd-scripts' lokr.factorization docstring examples, and a factor that does not divide
    assert [factorization(d) for d in (128, 512, 1024, 48, 64)] == [(8, 16), (16, 32), (32, 32), (6, 8), (8, 8)]
    assert [factorization(d, 4) for d in (128, 512)] == [(4, 32), (4, 128)]
    assert factorization(24, 5) == (4, 6) and factorization(37) == (1, 37)


@pytest.mark.parametrize("tucker", [False, True])
def test_lokr_shapes_init_and_delta_are_sd_scripts(tucker):
    # Linear 64 -> 48: in = 8 x 8, out = 6 x 8; w1 (out_l, in_m) is always full; w2 is low rank while
    # rank < max(out_k, in_n) / 2 = 4, else full (and then alpha = rank: no scaling)
    low = KohyaLoKrModule("lin", LINEAR, 2, 1.0, use_tucker=tucker)
    assert {n: tuple(p.shape) for n, p in low.named_parameters()} == {"lokr_w1": (6, 8), "lokr_w2_a": (8, 2),
                                                                     "lokr_w2_b": (2, 8)}
    assert not low.lokr_w2_b.any() and float(low.alpha) == 1.0
    full = KohyaLoKrModule("lin", LINEAR, 4, 1.0, use_tucker=tucker)
    assert {n: tuple(p.shape) for n, p in full.named_parameters()} == {"lokr_w1": (6, 8), "lokr_w2": (8, 8)}
    assert not full.lokr_w2.any() and float(full.alpha) == 4.0
    # factor 4: in 64 = 4 x 16, out 48 = 4 x 12
    factored = KohyaLoKrModule("lin", LINEAR, 2, 1.0, factor=4)
    assert {n: tuple(p.shape) for n, p in factored.named_parameters()} == {"lokr_w1": (4, 4), "lokr_w2_a": (12, 2),
                                                                          "lokr_w2_b": (2, 16)}
    # ΔW = kron(w1, w2_a @ w2_b) * alpha / rank
    _randomised(low), _randomised(full)
    x = torch.randn(3, 64)
    delta = torch.kron(low.lokr_w1, low.lokr_w2_a @ low.lokr_w2_b).detach() * 1.0 / 2
    torch.testing.assert_close(_output_change(low, LINEAR, x), x @ delta.T)
    delta = torch.kron(full.lokr_w1, full.lokr_w2).detach()
    torch.testing.assert_close(_output_change(full, LINEAR, x), x @ delta.T)
    # 3x3 conv 32 -> 24: in = 4 x 8, out = 4 x 6; max(6, 8) / 2 = 4
    conv = KohyaLoKrModule("conv", CONV, 2, 1.0, use_tucker=tucker)
    shapes = {n: tuple(p.shape) for n, p in conv.named_parameters()}
    if tucker:
        assert shapes == {"lokr_w1": (4, 4), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 6), "lokr_w2_b": (2, 8)}
    else:  # the kernel flattened into w2_b
        assert shapes == {"lokr_w1": (4, 4), "lokr_w2_a": (6, 2), "lokr_w2_b": (2, 8 * 9)}
    assert not conv.lokr_w2_b.any()
    full_conv = KohyaLoKrModule("conv", CONV, 4, 1.0, use_tucker=tucker)
    assert {n: tuple(p.shape) for n, p in full_conv.named_parameters()} == {"lokr_w1": (4, 4),
                                                                           "lokr_w2": (6, 8, 3, 3)}
    _randomised(conv)
    w = {n: p.detach() for n, p in conv.named_parameters()}
    if tucker:
        w2 = torch.einsum("i j k l, i p, j r -> p r k l", w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        delta = torch.kron(w["lokr_w1"][:, :, None, None], w2.contiguous()) * 1.0 / 2
    else:
        delta = torch.kron(w["lokr_w1"], w["lokr_w2_a"] @ w["lokr_w2_b"]).reshape(24, 32, 3, 3) * 1.0 / 2
    x = torch.randn(2, 32, 6, 6)
    torch.testing.assert_close(_output_change(conv, CONV, x), F.conv2d(x, delta, padding=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("module_class, options", [(KohyaLoHaModule, {}), (KohyaLoHaModule, {"use_tucker": True}),
                                                    (KohyaLoKrModule, {}), (KohyaLoKrModule, {"factor": 4})])
def test_lycoris_reads_the_same_update_from_the_tensors(module_class, options):
    """sd-scripts' LoHa/LoKr tensors are LyCORIS's: lycoris-lora's loader rebuilds the same ΔW from them (its
    forward weight, ``get_weight``; lycoris 4.1.3's ``get_diff_weight`` applies alpha / rank twice)."""
    from lycoris.modules import get_module, make_module

    for layer in (LINEAR, CONV):
        for rank in (2, 16):  # low-rank and (LoKr) full second factor
            module = _randomised(module_class("x", layer, rank, 1.5, **options))
            tensors = {f"x.{k}": v for k, v in module.state_dict().items()}
            lycoris_module = make_module(*get_module(tensors, "x"), "x", layer)
            torch.testing.assert_close(lycoris_module.get_weight(lycoris_module.shape).reshape(layer.weight.shape),
                                       module.delta_weight().reshape(layer.weight.shape), rtol=1e-4, atol=1e-5)


def test_loha_rank_dropout_drops_output_channels_and_rescales():
    module = _randomised(KohyaLoHaModule("lin", LINEAR, 4, 4.0, rank_dropout=0.5))
    x = torch.randn(5, 64)
    full = _output_change(module, LINEAR, x)
    module.train(True)
    torch.manual_seed(0)
    dropped_run = _output_change(module, LINEAR, x)
    dropped = (dropped_run == 0).all(dim=0)
    assert 0 < int(dropped.sum()) < 48  # whole output channels, the same for every sample
    torch.testing.assert_close(dropped_run[:, ~dropped], full[:, ~dropped] * 2)  # kept ones: x 1 / (1 - 0.5)


# ---- DyLoRA ------------------------------------------------------------------------------------------------------

def test_dylora_trains_one_unit_block_of_ranks_per_step_and_scales_by_it():
    torch.manual_seed(0)
    module = DyLoRAModule("lin", LINEAR, 8, 4.0, unit=2)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    module.apply_to()
    seen = set()
    for _ in range(60):
        module.train(True)
        module.zero_grad(set_to_none=True)
        x = torch.randn(3, 64)
        out = LINEAR(x)
        block = module.last_block
        seen.add(block)
        down, up = (w.detach() for w in module._weights(None))
        # every rank is used; the output is scaled by alpha / rank * sqrt(rank / (block + unit))
        expected = module._org_forward(x) + x @ down.T @ up.T * (4.0 / 8) * math.sqrt(8 / (block + 2))
        torch.testing.assert_close(out, expected)
        out.sum().backward()
        with_grad = [i for i, p in enumerate(module.lora_down) if p.grad is not None]
        assert with_grad == [block, block + 1]
        assert [i for i, p in enumerate(module.lora_up) if p.grad is not None] == with_grad
    assert seen == {0, 2, 4, 6}  # randint(0, rank - 1) rounded down to a multiple of unit
    module.train(False)
    x = torch.randn(3, 64)
    down, up = (w.detach() for w in module._weights(None))
    with torch.no_grad():
        torch.testing.assert_close(LINEAR(x), module._org_forward(x) + x @ down.T @ up.T * 0.5)
    module.restore()
    with pytest.raises(ValueError, match="multiple of unit"):
        DyLoRAModule("lin", LINEAR, 6, 4.0, unit=4)


def test_dylora_saves_an_ordinary_lora_and_loads_it_back():
    conv = DyLoRAModule("c", CONV, 4, 1.0)
    one = DyLoRAModule("p", nn.Conv2d(8, 12, 1), 4, 1.0)
    for module, down_shape, up_shape in ((conv, (4, 32, 3, 3), (24, 4, 1, 1)), (one, (4, 8, 1, 1), (12, 4, 1, 1))):
        sd = module.state_dict()
        assert {k: tuple(v.shape) for k, v in sd.items()} == {"alpha": (), "lora_down.weight": down_shape,
                                                              "lora_up.weight": up_shape}
        assert not sd["lora_up.weight"].any()
        other = DyLoRAModule(module.lora_name, module.org_module, 4, 3.0)
        other.load_state_dict({k: v + 1 for k, v in sd.items()})
        assert all(torch.equal(other.state_dict()[k], sd[k] + 1) for k in sd) and other.scale == 2.0 / 4


# ---- LoRA-FA -----------------------------------------------------------------------------------------------------

def test_lora_fa_trains_only_lora_up_from_sd_scripts_init():
    torch.manual_seed(0)
    layer = nn.Linear(1024, 512)
    module = LoRAFAModule("big", layer, 16, 8.0)
    assert [n for n, _ in module.named_parameters()] == ["lora_up.weight"]  # the optimizer's only weight
    assert set(module.state_dict()) == {"alpha", "lora_down.weight", "lora_up.weight"}
    # sd-scripts: down ~ normal(0, sqrt(2 / (in + rank))), up = 0
    assert module.lora_down.weight.std().item() == pytest.approx(math.sqrt(2 / (1024 + 16)), rel=0.03)
    assert abs(module.lora_down.weight.mean().item()) < 0.002 and not module.lora_up.weight.any()


# ---- training on the tiny models -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("lora_type, extra, kohya_ss", [
    ("Kohya LoHa", dict(use_tucker=True, rank_dropout=0.1), "conv_dim=2 conv_alpha=1 use_tucker=True rank_dropout=0.1"),
    ("Kohya LoKr", dict(factor=4, module_dropout=0.1), "conv_dim=2 conv_alpha=1 factor=4 module_dropout=0.1"),
])
def test_kohya_loha_lokr_train_on_sdxl_and_write_sd_scripts_keys(lora_type, extra, kohya_ss, tiny_sdxl_dir, images,
                                                                  tmp_path):  # noqa: F811
    settings = tiny_settings(tiny_sdxl_dir, images, tmp_path / "out", LoRA_type=lora_type, sdxl=True, conv_dim=2,
                             conv_alpha=1, max_train_steps=2, **extra)
    result = train(settings)
    assert result.status == "finished", result.error
    tensors, meta = _file(result.files[-1])
    assert meta["ss_network_module"] == ("networks.loha" if lora_type == "Kohya LoHa" else "networks.lokr")
    assert json.loads(meta["ss_network_args"]) == _kohya_ss_args(kohya_ss)
    layers = _sd_scripts_layers(settings, conv=True)
    assert any(n.startswith("lora_te1_") for n in layers) and any(n.startswith("lora_te2_") for n in layers)
    expected = {}
    for name, layer in layers.items():
        expected.update(_expected_tensors(lora_type, name, layer, rank=4, conv_rank=2, **extra))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert all(torch.isfinite(t).all() for t in tensors.values())
    # the factor that starts at 0 has learnt: the update is no longer 0
    zero_start = "hada_w2_a" if lora_type == "Kohya LoHa" else "lokr_w2_b"
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith(zero_start))


def _expected_tensors(lora_type, name, layer, rank, conv_rank, use_tucker=False, factor=-1, **_):
    """sd-scripts' tensors (name -> shape) of one layer's LoHa / LoKr module."""
    kxk = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
    r = conv_rank if kxk else rank
    in_dim = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
    out_dim = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    k = tuple(layer.kernel_size) if kxk else ()
    if lora_type == "Kohya LoHa":
        if kxk and use_tucker:
            shapes = {"hada_t1": (r, r, *k), "hada_w1_a": (r, out_dim), "hada_w1_b": (r, in_dim),
                      "hada_t2": (r, r, *k), "hada_w2_a": (r, out_dim), "hada_w2_b": (r, in_dim)}
        else:
            flat = in_dim * math.prod(k)
            shapes = {"hada_w1_a": (out_dim, r), "hada_w1_b": (r, flat), "hada_w2_a": (out_dim, r),
                      "hada_w2_b": (r, flat)}
    else:
        (in_m, in_n), (out_l, out_k) = factorization(in_dim, factor), factorization(out_dim, factor)
        shapes = {"lokr_w1": (out_l, in_m)}
        if r >= max(out_k, in_n) / 2:
            shapes["lokr_w2"] = (out_k, in_n, *k)
        elif kxk and use_tucker:
            shapes.update(lokr_t2=(r, r, *k), lokr_w2_a=(r, out_k), lokr_w2_b=(r, in_n))
        else:
            shapes.update(lokr_w2_a=(out_k, r), lokr_w2_b=(r, in_n * math.prod(k)))
    shapes["alpha"] = ()
    return {f"{name}.{key}": shape for key, shape in shapes.items()}


def test_kohya_loha_lokr_need_sdxl_as_in_kohya_ss(tiny_sd1_dir, tiny_sdxl_dir, images, tmp_path):  # noqa: F811
    for lora_type in ("Kohya LoHa", "Kohya LoKr"):
        settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type=lora_type)
        [error] = [p for p in check(settings, deep=False).errors if p.field == "LoRA_type"]
        assert "requires SDXL" in error.message and "not supported" in error.message
        settings = tiny_settings(tiny_sdxl_dir, images, tmp_path / "out", LoRA_type=lora_type, sdxl=True,
                                 network_dropout=0.1, scale_weight_norms=1)
        report = check(settings, deep=False)
        assert not [p for p in report.errors if p.field == "LoRA_type"]
        assert {p.field for p in report.warnings} >= {"network_dropout", "scale_weight_norms"}


@pytest.mark.slow
def test_kohya_dylora_trains_on_sd1_writes_lora_keys_and_unit_blocks(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type="Kohya DyLoRA", network_dim=4,
                             network_alpha=2, unit=2, conv_dim=4, conv_alpha=1, max_train_steps=2)
    result = train(settings)
    assert result.status == "finished", result.error
    tensors, meta = _file(result.files[-1])
    assert meta["ss_network_module"] == "networks.dylora"
    # kohya_ss passes its filled-in settings: conv_dim, conv_alpha, unit (rank/module dropout are 0)
    assert json.loads(meta["ss_network_args"]) == _kohya_ss_args("conv_dim=4 conv_alpha=1 unit=2")
    layers = _sd_scripts_layers(settings, conv=True)  # conv_dim given: the ResNet classes too (3x3 at rank 4)
    assert {k.split(".", 1)[0] for k in tensors} == set(layers)
    for name, layer in layers.items():
        conv = isinstance(layer, nn.Conv2d)
        in_dim, out_dim = (layer.in_channels, layer.out_channels) if conv else (layer.in_features, layer.out_features)
        kernel = tuple(layer.kernel_size) if conv else ()
        assert tuple(tensors[f"{name}.lora_down.weight"].shape) == (4, in_dim, *kernel)
        assert tuple(tensors[f"{name}.lora_up.weight"].shape) == (out_dim, 4, *((1, 1) if conv else ()))
        assert float(tensors[f"{name}.alpha"]) == 2.0  # 3x3 convs too: networks.dylora gives them network_alpha
    assert len(tensors) == 3 * len(layers)
    # lora_up starts at 0 and each step trains one block of `unit` ranks: after 2 steps, at most 2 blocks have moved
    moved_blocks = []
    for name in layers:
        up = tensors[f"{name}.lora_up.weight"].flatten(1)
        moved = {i // 2 for i in range(4) if up[:, i].any()}
        assert len(moved) <= 2
        moved_blocks.append(len(moved))
    assert max(moved_blocks) >= 1


def test_kohya_dylora_check_refuses_what_sd_scripts_refuses(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type="Kohya DyLoRA", network_dim=6, unit=4,
                             conv_dim=4, rank_dropout=0.1)
    report = check(settings, deep=False)
    assert {p.field for p in report.errors} >= {"unit", "conv_dim"}
    assert "rank_dropout" in {p.field for p in report.warnings}
    ok = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type="Kohya DyLoRA", network_dim=8, unit=4,
                       conv_dim=0)
    report = check(ok, deep=False)
    assert not [p for p in report.errors if p.field in ("unit", "conv_dim", "LoRA_type")]
    assert not [p for p in report.notes if p.field == "LoRA_type"]


def test_kohya_dylora_on_sdxl_names_both_text_encoders_apart(tiny_sdxl_dir, images, tmp_path):  # noqa: F811
    settings = tiny_settings(tiny_sdxl_dir, images, tmp_path / "out", LoRA_type="Kohya DyLoRA", sdxl=True)
    [note] = [p for p in check(settings, deep=False).notes if p.field == "LoRA_type"]
    assert "lora_te1_" in note.message
    settings = tiny_settings(tiny_sdxl_dir, images, tmp_path / "out", LoRA_type="Kohya DyLoRA", sdxl=True,
                             sdxl_cache_text_encoder_outputs=True, text_encoder_lr=0)
    assert not [p for p in check(settings, deep=False).notes if p.field == "LoRA_type"]


@pytest.mark.slow
def test_lora_fa_trains_lora_up_only_and_writes_lora_keys(tiny_sd1_dir, images, tmp_path, monkeypatch):  # noqa: F811
    from trainer.network.network import LoRANetwork

    initial = {}
    original = LoRANetwork._of_kohya_type.__func__

    def recording(cls, layers, spec, generator):
        network = original(cls, layers, spec, generator)
        initial.update(network.lora_state_dict(copy=True))
        return network

    monkeypatch.setattr(LoRANetwork, "_of_kohya_type", classmethod(recording))
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type="LoRA-FA", conv_dim=4, rank_dropout=0.1,
                             loraplus_lr_ratio=4, max_train_steps=2)
    result = train(settings)
    assert result.status == "finished", result.error
    tensors, meta = _file(result.files[-1])
    assert meta["ss_network_module"] == "networks.lora_fa"
    # kohya_ss passes no conv_dim to networks.lora_fa; the LoRA+ ratio is passed (and not read by sd-scripts)
    assert json.loads(meta["ss_network_args"]) == _kohya_ss_args("rank_dropout=0.1 loraplus_lr_ratio=4")
    layers = _sd_scripts_layers(settings, conv=False)  # no conv_dim: Transformer2DModel and CLIP layers only
    assert set(tensors) == {f"{n}.{k}" for n in layers for k in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(initial) == set(tensors)
    downs = [k for k in tensors if k.endswith("lora_down.weight")]
    assert all(torch.equal(tensors[k], initial[k]) for k in downs)  # frozen
    ups = [k.removesuffix("lora_down.weight") + "lora_up.weight" for k in downs]
    assert not any(initial[k].any() for k in ups) and any(tensors[k].any() for k in ups)  # lora_up learnt


def test_kohya_ss_network_args_recipes():
    from trainer.lora_types import TYPES, kohya_own_network_args
    from trainer.settings import TrainingSettings

    def args(lora_type, **values):
        return kohya_own_network_args(TrainingSettings(LoRA_type=lora_type, **values), TYPES[lora_type])

    # build_native_loha_lokr_network_args: only what differs from sd-scripts' defaults
    assert args("Kohya LoHa", conv_dim=0, factor=8) == {}
    assert args("Kohya LoKr", conv_dim=8, conv_alpha=2.5, use_tucker=True, factor=8, rank_dropout=0.2) == \
        _kohya_ss_args("conv_dim=8 conv_alpha=2.5 use_tucker=True factor=8 rank_dropout=0.2")
    # DyLoRA / LoRA-FA: every truthy setting of kohya_ss's list, in its order (conv_alpha even without conv_dim)
    assert list(args("Kohya DyLoRA", conv_dim=0, conv_alpha=1, unit=4, module_dropout=0.1).items()) == \
        [("conv_alpha", "1"), ("unit", "4"), ("module_dropout", "0.1")]
    assert args("LoRA-FA", conv_dim=8, module_dropout=0.1) == {"module_dropout": "0.1"}


def test_loraplus_groups_as_sd_scripts_reads_it():
    """networks.dylora puts its lora_B (up) rows in the LoRA+ group; networks.lora_fa reads no LoRA+ ratio."""
    from trainer.network import LoRANetwork, LoraTarget, Role
    from trainer.network_spec import NetworkSpec
    from trainer.settings import TrainingSettings

    class Transformer2DModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(16, 16)

    root = nn.Module()
    root.block = Transformer2DModel()
    target = LoraTarget("lora_unet", root, ("Transformer2DModel",), Role.UNET)
    spec = NetworkSpec(rank=4, alpha=4, network_module="networks.dylora", dylora_unit=2, plus_unet=16)
    network = LoRANetwork.build([target], spec)
    groups = {g["name"]: g for g in network.param_groups({Role.UNET: 1e-4}, spec.plus_ratios())}
    assert len(groups["unet plus"]["params"]) == len(groups["unet"]["params"]) == 4  # one parameter per rank row
    assert groups["unet plus"]["lr"] == pytest.approx(16e-4)
    network.restore()
    lora_fa = NetworkSpec.from_settings(TrainingSettings(LoRA_type="LoRA-FA", loraplus_lr_ratio=16))
    assert lora_fa.plus_ratios() == {"unet": 0.0, "textencoder": 0.0}
    assert NetworkSpec.from_settings(TrainingSettings(LoRA_type="Kohya DyLoRA", loraplus_lr_ratio=16)).plus_unet == 16


@pytest.mark.slow
def test_kohya_dylora_resumes_to_the_same_file_as_an_uninterrupted_run(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    """The per-rank parameters, the optimizer state and the rank draws all come back from a state folder."""
    from safetensors.torch import load_file

    common = dict(LoRA_type="Kohya DyLoRA", network_dim=4, network_alpha=2, unit=1, conv_dim=4, epoch=2)
    straight = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "a", **common))
    first = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "b", save_state=True, save_every_n_epochs=1,
                                **common))
    assert straight.status == first.status == "finished", (straight.error, first.error)
    [state] = [p for p in (tmp_path / "b").iterdir() if p.name.endswith("-state") and "000001" in p.name]
    resumed = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "c", resume=str(state), **common))
    assert resumed.status == "finished", resumed.error
    a, c = load_file(str(tmp_path / "a" / "tiny.safetensors")), load_file(str(tmp_path / "c" / "tiny.safetensors"))
    assert set(a) == set(c)
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=1e-5, atol=1e-6)
