"""LyCORIS LoRA types train through lycoris-lora (kohya_ss's own pin) and write the files kohya_ss writes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from test_train import images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer.lora_types import TYPES, lycoris_network_args
from trainer.loop import train
from trainer.preflight import check

# each type's own tensor names (LyCORIS's keys, as A1111's and ComfyUI's LyCORIS loaders read them)
TYPE_KEYS = {
    "LyCORIS/LoCon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "LyCORIS/LoHa": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "LyCORIS/LoKr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "LyCORIS/iA3": {"weight", "on_input"},
    "LyCORIS/Diag-OFT": {"oft_blocks", "alpha"},
    "LyCORIS/BOFT": {"oft_blocks", "alpha"},
    "LyCORIS/GLoRA": {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"},
    "LyCORIS/DyLoRA": {"lora_down.weight", "lora_up.weight", "alpha"},
    "LyCORIS/Native Fine-Tuning": {"diff", "diff_b"},
}


def _file(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _loaded_family(settings):
    from trainer.families.registry import create_family

    family = create_family(settings)
    family.load(settings, torch.float32, torch.device("cpu"), lambda *a, **k: None)
    return family


def _lycoris_names(lora_type, settings, tmp_path, with_text_encoder: bool) -> set[str]:
    """The module names lycoris.kohya itself gives the same model and arguments (SD1: diffusers names, as
    sd-scripts' SD1 UNet has). Its "full" preset also names the TimestepEmbedding class, whose layers it
    names again as time_embedding.linear_1/2 (LyCORIS 4 then stops on a duplicate): the preset without it.
    Nekoya's CLIP has no ``text_model`` level; transformers 4's, which sd-scripts trains, has: its keys carry it."""
    import toml
    from lycoris import kohya as lycoris_kohya
    from lycoris.config import PRESET

    preset = dict(PRESET["full"])
    preset["unet_target_module"] = [m for m in preset["unet_target_module"] if m != "TimestepEmbedding"]
    preset_file = tmp_path / "full.toml"
    preset_file.write_text(toml.dumps(preset))
    family = _loaded_family(settings)
    args = dict(lycoris_network_args(settings, TYPES[lora_type]), preset=str(preset_file))
    saved = dict(vars(lycoris_kohya.LycorisNetworkKohya))
    try:
        network = lycoris_kohya.create_network(1.0, settings.network_dim, settings.network_alpha, None,
                                               family.text_encoders[0] if with_text_encoder else None,
                                               family.unet, **args)
    finally:
        for k in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "ENABLE_CONV",
                  "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME"):
            setattr(lycoris_kohya.LycorisNetworkKohya, k, saved[k])
    names = {m.lora_name for m in network.unet_loras}
    return names | {m.lora_name.replace("lora_te_", "lora_te_text_model_", 1) for m in network.text_encoder_loras}


@pytest.mark.slow
@pytest.mark.parametrize("lora_type", sorted(TYPE_KEYS))
def test_each_lycoris_type_trains_and_writes_lycoris_keys(lora_type, tiny_sd1_dir, images, tmp_path):  # noqa: F811
    # BOFT factors each layer size into blocks: the tiny text encoder's odd MLP width (37) has none
    te_lr = 0.0 if lora_type == "LyCORIS/BOFT" else 1e-3
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type=lora_type, conv_dim=2, conv_alpha=1,
                             text_encoder_lr=te_lr, max_train_steps=2)
    result = train(settings)
    assert result.status == "finished", result.error
    tensors, meta = _file(result.files[-1])
    modules = {key.split(".", 1)[0] for key in tensors}
    suffixes = {key.split(".", 1)[1] for key in tensors}
    assert suffixes <= TYPE_KEYS[lora_type] and suffixes & TYPE_KEYS[lora_type]
    assert all(torch.isfinite(t).all() for t in tensors.values())
    # target selection is LyCORIS's own: the same modules lycoris.kohya picks on this model, named as sd-scripts
    assert modules == _lycoris_names(lora_type, settings, tmp_path, with_text_encoder=bool(te_lr))
    te = {m for m in modules if m.startswith("lora_te")}
    assert bool(te) == bool(te_lr)
    assert all(m.startswith("lora_te_text_model_encoder_layers_") for m in te)  # sd-scripts' CLIP key names
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == TYPES[lora_type].algo


@pytest.mark.slow
def test_lokr_network_args_are_kohya_ss_s_and_loading_back_gives_the_same_update(tiny_sd1_dir, images,  # noqa: F811
                                                                                 tmp_path):
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type="LyCORIS/LoKr", factor=4,
                             network_dim=100000, network_alpha=1, conv_dim=100000, conv_alpha=1, max_train_steps=2)
    result = train(settings)
    assert result.status == "finished", result.error
    tensors, meta = _file(result.files[-1])
    # kohya_ss's lora_gui.py f-string for LyCORIS/LoKr with these values, split as sd-scripts splits it
    kohya_ss = ("preset=full conv_dim=100000 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False "
                "dora_wd=False module_dropout=0 factor=4 use_cp=False use_scalar=False decompose_both=False "
                "rank_dropout_scale=False algo=lokr train_norm=False")
    assert json.loads(meta["ss_network_args"]) == dict(arg.split("=") for arg in kohya_ss.split())
    assert "lokr_w2" in {k.split(".", 1)[1] for k in tensors}  # rank 100000: the full-matrix factor
    # LyCORIS's own loader (what its tools and sd-scripts' merges use) rebuilds each UNet module from the file,
    # and its weight change is the one the trained module adds
    from lycoris.modules import LokrModule, get_module, make_module

    family = _loaded_family(settings)
    layers = {f"lora_unet_{path}".replace(".", "_"): layer for path, layer in family.unet.named_modules()}
    names = {k.split(".", 1)[0] for k in tensors if k.startswith("lora_unet_")}
    for name in names:
        module_class, params = get_module(tensors, name)
        assert module_class is LokrModule, name
        module = make_module(module_class, params, name, layers[name])
        assert torch.isfinite(module.get_diff_weight(1.0)[0]).all()


@pytest.mark.slow
def test_sdxl_lycoris_keys_use_sd_scripts_sgm_names(tiny_sdxl_dir, images, tmp_path):  # noqa: F811
    settings = tiny_settings(tiny_sdxl_dir, images, tmp_path / "out", LoRA_type="LyCORIS/LoHa", sdxl=True,
                             conv_dim=2, conv_alpha=1, max_train_steps=1)
    result = train(settings)
    assert result.status == "finished", result.error
    tensors, _ = _file(result.files[-1])
    modules = {key.split(".", 1)[0] for key in tensors}
    unet = {m for m in modules if m.startswith("lora_unet_")}
    assert unet and all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
                        for m in unet)
    assert any("_in_layers_2" in m for m in unet)  # ResNet convs (LoCon-style): sd-scripts' SGM child names
    assert any(m.startswith("lora_te1_text_model_") for m in modules)
    assert any(m.startswith("lora_te2_text_model_") for m in modules)
    # the preset's name targets (conv_in, time_embedding...) are diffusers paths sd-scripts' SDXL UNet lacks
    assert not any("conv_in" in m or "time_embedding" in m for m in unet)


def test_lycoris_build_draws_from_the_run_generator_and_leaves_the_global_rng_alone():
    from torch import nn

    from trainer.network import LoRANetwork, LoraTarget, Role
    from trainer.network_spec import NetworkSpec

    class Transformer2DModel(nn.Module):  # a LyCORIS "full" preset target class
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(16, 16)

    spec = NetworkSpec(rank=4, alpha=4, network_module="lycoris.kohya",
                       lycoris_args={"algo": "loha", "preset": "full"})

    root = nn.Module()
    root.block = Transformer2DModel()
    target = LoraTarget("lora_unet", root, ("Transformer2DModel",), Role.UNET)

    def build(seed):
        network = LoRANetwork.build([target], spec, torch.Generator().manual_seed(seed))
        network.restore()
        return network.lora_state_dict(copy=True)

    torch.manual_seed(0)
    before = torch.get_rng_state()
    first, again, other = build(1), build(1), build(2)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(first) == {f"lora_unet_block_to_q.{k}" for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                                                                 "alpha")}
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["lora_unet_block_to_q.hada_w1_a"], other["lora_unet_block_to_q.hada_w1_a"])


def test_check_names_a_bad_preset_and_settings_lycoris_does_not_read(tiny_sd1_dir, images, tmp_path):  # noqa: F811
    bad = tmp_path / "preset.toml"
    bad.write_text("unet_target_module = [\n")
    for preset, expected in ((str(tmp_path / "missing.toml"), "does not exist"), (str(bad), "not valid TOML"),
                             ("everything", "neither a LyCORIS preset name")):
        settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type="LyCORIS/LoHa",
                                 LyCORIS_preset=preset)
        errors = [p for p in check(settings, deep=False).errors if p.field == "LyCORIS_preset"]
        assert errors and expected in errors[0].message, preset
    good = tmp_path / "attn.toml"
    good.write_text('enable_conv = false\nunet_target_module = ["Transformer2DModel"]\n'
                    'text_encoder_target_module = ["CLIPAttention"]\n')
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type="LyCORIS/iA3", LyCORIS_preset=str(good),
                             network_dropout=0.1)
    report = check(settings, deep=False)
    assert not [p for p in report.errors if p.field == "LyCORIS_preset"]
    assert [p for p in report.warnings if p.field == "network_dropout"]


def test_kohya_lokr_preset_with_rank_100000_loads(tmp_path):
    """kohya_ss's LoKr presets mean "full matrix" by network_dim/conv_dim 100000."""
    from trainer.settings import read_settings_file

    config = tmp_path / "lokr.json"
    config.write_text(json.dumps({"LoRA_type": "LyCORIS/LoKr", "network_dim": 100000, "conv_dim": 100000,
                                  "network_alpha": 1, "conv_alpha": 1, "factor": 8, "LyCORIS_preset": "full",
                                  "use_cp": False, "decompose_both": False, "train_norm": False}))
    settings = read_settings_file(str(config)).settings
    assert (settings.network_dim, settings.conv_dim, settings.factor) == (100000, 100000, 8)


@pytest.mark.slow
@pytest.mark.parametrize("lora_type", ["Standard", "LyCORIS/LoCon"])
def test_loraplus_trains_lora_up_at_ratio_times_the_rate_and_is_recorded(lora_type, tiny_sd1_dir, images,  # noqa: F811
                                                                         tmp_path, monkeypatch):
    from trainer.optim import stepper

    seen = {}
    original = stepper.OptimizerStepper.__init__

    def recording(self, optimizer, *args, **kwargs):
        seen.update({g["name"]: (g["lr"], len(g["params"])) for g in optimizer.param_groups})
        original(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(stepper.OptimizerStepper, "__init__", recording)
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type=lora_type, loraplus_lr_ratio=16,
                             loraplus_text_encoder_lr_ratio=4, unet_lr=1e-4, text_encoder_lr=1e-5, max_train_steps=1)
    result = train(settings)
    assert result.status == "finished", result.error
    assert seen["unet plus"][0] == pytest.approx(16e-4) and seen["unet"][0] == pytest.approx(1e-4)
    assert seen["textencoder plus"][0] == pytest.approx(4e-5)
    assert seen["unet plus"][1] == seen["unet"][1]  # each module: lora_up in one group, lora_down in the other
    _, meta = _file(result.files[-1])
    args = json.loads(meta["ss_network_args"])
    assert (args["loraplus_lr_ratio"], args["loraplus_text_encoder_lr_ratio"]) == ("16", "4")
    assert "loraplus_unet_lr_ratio" not in args


@pytest.mark.parametrize("values, field, words", [
    ({"LoRA_type": "LyCORIS/iA3"}, "LoRA_type", "ComfyUI has no iA3 loader"),
    ({"LoRA_type": "LyCORIS/GLoRA"}, "LoRA_type", "AUTOMATIC1111 implements only the old GLoRA layout"),
    ({"LoRA_type": "LyCORIS/LoHa", "dora_wd": True}, "dora_wd", "AUTOMATIC1111 normalises DoRA"),
    ({"LoRA_type": "LyCORIS/LoKr", "use_tucker": True}, "use_tucker", "ComfyUI fails on the 3x3 conv"),
])
def test_check_warns_when_a_file_would_not_load_as_trained(values, field, words, tiny_sd1_dir, images,  # noqa: F811
                                                           tmp_path):
    report = check(tiny_settings(tiny_sd1_dir, images, tmp_path / "out", **values), deep=False)
    assert any(p.field == field and words in p.message for p in report.warnings), report.warnings
    plain = check(tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type="LyCORIS/LoHa"), deep=False)
    assert not any("will not work everywhere" in p.message for p in plain.warnings)


def test_loraplus_speeds_up_what_sd_scripts_speeds_up_for_kohya_loha_and_lokr():
    """sd-scripts' network_base: lora_up, hada_w2_a and lokr_w1* learn at lr x ratio."""
    from torch import nn

    from trainer.network import LoRANetwork, LoraTarget, Role
    from trainer.network_spec import NetworkSpec

    class Transformer2DModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(16, 16)

    root = nn.Module()
    root.block = Transformer2DModel()
    target = LoraTarget("lora_unet", root, ("Transformer2DModel",), Role.UNET)
    for module, fast in (("networks.loha", {"hada_w2_a"}), ("networks.lokr", {"lokr_w1"})):
        spec = NetworkSpec(rank=4, alpha=4, network_module=module, plus_unet=8)
        network = LoRANetwork.build([target], spec)
        groups = {g["name"]: g for g in network.param_groups({Role.UNET: 1e-4}, spec.plus_ratios(), None,
                                                             spec.plus_parameters)}
        names = {id(p): n for n, p in network.named_parameters()}
        assert {names[id(p)].split(".")[-1] for p in groups["unet plus"]["params"]} == fast
        assert groups["unet plus"]["lr"] == pytest.approx(8e-4)
        network.restore()


@pytest.mark.slow
@pytest.mark.parametrize("lora_type", ["LyCORIS/LoCon", "LyCORIS/LoHa"])
def test_dora_trains_and_writes_dora_scale(lora_type, tiny_sd1_dir, images, tmp_path):  # noqa: F811
    """DoRA as kohya_ss offers it (LyCORIS's dora_wd): each module also learns its weight's magnitude."""
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type=lora_type, dora_wd=True,
                             conv_dim=2, conv_alpha=1, max_train_steps=2)
    result = train(settings)
    assert result.status == "finished", result.error
    tensors, meta = _file(result.files[-1])
    scales = [k for k in tensors if k.endswith(".dora_scale")]
    assert scales and len(scales) == len({k.split(".", 1)[0] for k in tensors})
    assert json.loads(meta["ss_network_args"])["dora_wd"] == "True"
