"""FLUX.1 without training: the BFL-layout model against diffusers, the key maps, sd-scripts' LoRA module list,
the flow-matching schedule, settings, detection and the check."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.families import spec_for_settings
from trainer.families.flow_matching import FlowConfig, FlowMatchingSchedule
from trainer.families.flux_spec import DOUBLE_BLOCKS, FLUX1, SINGLE_BLOCKS
from trainer.families.flux_weights import config_from_bfl_shapes, config_from_diffusers, diffusers_to_bfl
from trainer.models.flux import Flux, FluxConfig, image_ids, pack_latents, unpack_latents
from trainer.settings import TrainingSettings

from flux_support import tiny_flux_dir, tiny_flux_files  # noqa: F401  (fixtures)

DOUBLE_LINEARS = ("mod_lin", "attn_qkv", "attn_proj", "mlp_0", "mlp_2")
SINGLE_LINEARS = ("linear1", "linear2", "modulation_lin")
CLIP_LINEARS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def sd_scripts_module_names(double: int, single: int, clip_layers: int = 0, single_only: bool = False) -> set[str]:
    """What networks.lora_flux's target rules give: every Linear of each DoubleStreamBlock (img_/txt_ mod.lin,
    attn.qkv, attn.proj, mlp.0, mlp.2) and SingleStreamBlock (linear1, linear2, modulation.lin), and CLIP-L's
    attention and MLP Linears under lora_te1 (written from BFL's architecture, not from Nekoya's modules)."""
    names = {f"lora_unet_single_blocks_{i}_{m}" for i in range(single) for m in SINGLE_LINEARS}
    if not single_only:
        names |= {f"lora_unet_double_blocks_{i}_{s}_{m}" for i in range(double) for s in ("img", "txt")
                  for m in DOUBLE_LINEARS}
    names |= {f"lora_te1_text_model_encoder_layers_{i}_{m}" for i in range(clip_layers) for m in CLIP_LINEARS}
    return names


@pytest.fixture(scope="module")
def tiny_diffusers_transformer():
    from diffusers import FluxTransformer2DModel

    from trainer.devtools.tiny_flux import TINY_TRANSFORMER

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_TRANSFORMER, guidance_embeds=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_bfl_layout_model_computes_what_diffusers_flux_computes(tiny_diffusers_transformer):
    reference = tiny_diffusers_transformer
    state = diffusers_to_bfl(reference.state_dict())
    config = config_from_bfl_shapes({k: tuple(v.shape) for k, v in state.items()})
    assert config == config_from_diffusers(reference.config)
    model = Flux(config).eval()
    model.load_state_dict(state, strict=True)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    txt, y = torch.randn(2, 7, 32, generator=generator), torch.randn(2, 32, generator=generator)
    t, g = torch.tensor([0.3, 0.8]), torch.tensor([3.5, 1.0])
    img, ids, txt_ids = pack_latents(latents), image_ids(2, 4, 4), torch.zeros(2, 7, 3)
    with torch.no_grad():
        ours = model(img, ids, txt, txt_ids, t, y, g)
        theirs = reference(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                           img_ids=ids[0], txt_ids=txt_ids[0], guidance=g).sample
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert torch.equal(unpack_latents(img, 4, 4), latents)


def test_key_map_is_the_inverse_of_diffusers_converter_at_flux1_width():
    """diffusers' own BFL->diffusers converter (full width only) takes our map's output back to diffusers' keys."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        full = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    original = full.state_dict()
    bfl = diffusers_to_bfl(original)
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(back) == set(original)
    assert all(back[k].shape == original[k].shape for k in original)


def test_full_size_lora_targets_are_sd_scripts_modules_and_the_spec_figure():
    from trainer.families.flux import FluxFamily
    from trainer.network.targets import find_target_layers

    family = FluxFamily(TrainingSettings(flux1_checkbox=True, flux1_cache_text_encoder_outputs=True))
    with torch.device("meta"):
        family.unet = Flux(FluxConfig())
    [target] = [t for t in _unet_only(family.lora_targets())]
    layers = find_target_layers(target, with_conv=False)
    assert {layer.lora_name for layer in layers} == sd_scripts_module_names(DOUBLE_BLOCKS, SINGLE_BLOCKS)
    per_rank = sum(layer.module.in_features + layer.module.out_features for layer in layers)
    assert per_rank == FLUX1.unet_lora_per_rank
    assert sum(p.numel() for p in family.unet.parameters()) == FLUX1.unet_params


def _unet_only(targets):
    return [t for t in targets if t.prefix == "lora_unet"]


def test_flow_matching_noise_target_and_prediction_types():
    latents, noise = torch.full((2, 4, 2, 2), 2.0), torch.full((2, 4, 2, 2), -1.0)
    timesteps = torch.tensor([250.0, 1000.0])
    schedule = FlowMatchingSchedule(FlowConfig(model_prediction_type="sigma_scaled"))
    noisy = schedule.add_noise(latents, noise, timesteps)
    assert torch.allclose(noisy[0], torch.full((4, 2, 2), 0.75 * 2 - 0.25)) and torch.allclose(noisy[1], noise[1])
    assert torch.equal(schedule.target(latents, noise, timesteps), noise - latents)
    pred = torch.ones_like(latents)
    assert torch.allclose(schedule.apply_prediction_type(pred, noisy, timesteps)[0], noisy[0] - 0.25)
    raw = FlowMatchingSchedule(FlowConfig(model_prediction_type="raw"))
    assert torch.equal(raw.apply_prediction_type(pred, noisy, timesteps), pred)
    additive = FlowMatchingSchedule(FlowConfig(model_prediction_type="additive"))
    assert torch.equal(additive.apply_prediction_type(pred, noisy, timesteps), pred + noisy)


@pytest.mark.parametrize("sampling", ["sigma", "uniform", "sigmoid", "shift", "flux_shift"])
def test_timestep_sampling_draws_sd_scripts_distributions(sampling):
    config = FlowConfig(timestep_sampling=sampling, discrete_flow_shift=3.0, image_tokens=1024)
    schedule = FlowMatchingSchedule(config)
    t = schedule.sample_timesteps(4000, None, torch.Generator().manual_seed(0), "cpu")
    sigmas = t / 1000
    assert t.dtype == torch.float32 and t.shape == (4000,) and 0 < sigmas.min() and sigmas.max() <= 1
    median = sigmas.median().item()
    expected = {  # the median of each distribution: uniform/sigmoid 0.5; shifted ones 3*0.5/(1+2*0.5)
        "uniform": 0.5, "sigmoid": 0.5, "shift": 0.75, "sigma": 0.75,
        "flux_shift": math.exp(0.5 + 0.65 * (1024 - 256) / 3840) / (math.exp(0.5 + 0.65 * (1024 - 256) / 3840) + 1),
    }[sampling]
    assert abs(median - expected) < 0.03, (sampling, median, expected)


def test_logit_normal_and_mode_weighting_change_the_sigma_draws():
    base = FlowMatchingSchedule(FlowConfig(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_mean=2.0))
    draws = base.sample_timesteps(2000, None, torch.Generator().manual_seed(0), "cpu") / 1000
    uniform = FlowMatchingSchedule(FlowConfig()).sample_timesteps(2000, None, torch.Generator().manual_seed(0), "cpu")
    assert draws.median() < uniform.median() / 1000  # u shifted up picks smaller sigmas of the descending table


def test_the_flux_checkbox_selects_the_family_and_its_settings_show():
    from trainer.settings import setting_info

    settings = TrainingSettings(flux1_checkbox=True)
    assert spec_for_settings(settings) is FLUX1 and spec_for_settings(TrainingSettings()) is not FLUX1
    for key in ("ae", "clip_l", "t5xxl", "guidance_scale", "timestep_sampling", "discrete_flow_shift"):
        info = setting_info(key)
        assert info.is_visible({"flux1_checkbox": True}) and not info.is_visible({"flux1_checkbox": False})
    assert setting_info("timestep_sampling").choices == ("flux_shift", "sigma", "shift", "sigmoid", "uniform")
    assert (settings.discrete_flow_shift, settings.model_prediction_type, settings.guidance_scale,
            settings.t5xxl_max_token_length) == (3.0, "sigma_scaled", 3.5, 512)


def test_detection_finds_flux_folders_and_bfl_files(tiny_flux_dir, tiny_flux_files):
    from trainer.checkpoints import detect

    assert detect(tiny_flux_dir).family == FLUX1.layout
    info = detect(tiny_flux_files["transformer"])
    assert info.family == FLUX1.layout and info.ok
    assert detect(tiny_flux_files["ae"]).family is None  # an AE alone is not a base model


def test_single_files_load_the_same_weights_as_the_folder(tiny_flux_dir, tiny_flux_files):
    from trainer.families.flux_load import load_flux

    folder = load_flux(TrainingSettings(flux1_checkbox=True, pretrained_model_name_or_path=str(tiny_flux_dir)),
                       torch.float32)
    files = load_flux(flux_file_settings(tiny_flux_files), torch.float32)
    for a, b in ((folder.transformer, files.transformer), (folder.clip, files.clip), (folder.t5, files.t5),
                 (folder.vae, files.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not any(t.is_meta for t in b.buffers())  # non-persistent buffers (CLIP's position ids) are filled
    ids = folder.clip_tokenizer(["a photo of sks dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(folder.clip(ids).pooler_output, files.clip(ids).pooler_output)


def flux_file_settings(files, **overrides) -> TrainingSettings:
    return TrainingSettings(flux1_checkbox=True, pretrained_model_name_or_path=str(files["transformer"]),
                            clip_l=str(files["clip_l"]), t5xxl=str(files["t5xxl"]), ae=str(files["ae"]), **overrides)


def test_the_check_names_missing_flux_files_before_loading(tiny_flux_files, tmp_path):
    from trainer.preflight import check

    settings = flux_file_settings(tiny_flux_files, LoRA_type="Flux1").model_copy(
        update={"t5xxl": "", "clip_l": str(tiny_flux_files["ae"]), "output_dir": str(tmp_path)})
    errors = {p.field: p for p in check(settings, deep=False).errors}
    assert "t5xxl is empty" in errors["t5xxl"].message and "t5xxl_fp16" in errors["t5xxl"].fix
    assert "is not a CLIP-L file" in errors["clip_l"].message
    import shutil

    lone = tmp_path / "lone" / "t5xxl.safetensors"  # a t5xxl file without its tokenizer
    lone.parent.mkdir()
    shutil.copy(tiny_flux_files["t5xxl"], lone)
    errors = {p.field: p for p in check(settings.model_copy(update={"t5xxl": str(lone)}), deep=False).errors}
    assert "no T5 tokenizer for t5xxl.safetensors" in errors["t5xxl"].message and "tokenizer.json" in errors["t5xxl"].fix
    wrong_type = check(flux_file_settings(tiny_flux_files, LoRA_type="Standard", output_dir=str(tmp_path)), deep=False)
    assert any(p.field == "LoRA_type" and "Flux1" in p.fix for p in wrong_type.errors)
    refused = check(flux_file_settings(tiny_flux_files, LoRA_type="Flux1", output_dir=str(tmp_path), model_type="chroma",
                                       weighted_captions=True, train_t5xxl=True, flux1_cache_text_encoder_outputs=True),
                    deep=False)
    assert {"model_type", "weighted_captions", "train_t5xxl"} <= {p.field for p in refused.errors}
    sizes = check(flux_file_settings(tiny_flux_files, LoRA_type="Flux1", output_dir=str(tmp_path),
                                     max_resolution="72,64", enable_bucket=True, bucket_reso_steps=48), deep=False)
    assert {"max_resolution", "bucket_reso_steps"} <= {p.field for p in sizes.errors}


def test_caching_text_encoder_outputs_to_disk_turns_caching_on_as_in_sd_scripts():
    from trainer.families.flux import FluxFamily

    family = FluxFamily(TrainingSettings(flux1_checkbox=True, flux1_cache_text_encoder_outputs_to_disk=True))
    assert family.cache_text_encoder_outputs


def test_flux_keys_nekoya_does_not_apply_yet_warn_in_flux_runs_only(tmp_path):
    from trainer.preflight import check
    from trainer.preflight.report import SettingNotApplied

    def not_applied(**values):
        report = check(TrainingSettings(output_dir=str(tmp_path), blocks_to_swap=16, train_lora_ggpo=True, **values),
                       deep=False)
        return {p.field: p for p in report.warnings if isinstance(p, SettingNotApplied)}

    flux = not_applied(flux1_checkbox=True, LoRA_type="Flux1")
    assert "blocks_to_swap = 16 is not applied: Nekoya does not apply it to FLUX.1 runs yet" in flux["blocks_to_swap"].message
    assert "the LoRA file would differ" in flux["train_lora_ggpo"].message
    sd = not_applied()
    assert "blocks_to_swap" not in sd and "train_lora_ggpo" not in sd


def test_the_run_noise_sampler_draws_timesteps_through_the_flux_schedule():
    from trainer.families.flux import FluxFamily
    from trainer.noise import NoiseConfig
    from trainer.noise_sampling import RandomNoise

    family = FluxFamily(TrainingSettings(flux1_checkbox=True, timestep_sampling="shift", discrete_flow_shift=3.0))
    sampler = RandomNoise(NoiseConfig(), family.noise_schedule("cpu"), seed=1)
    draw = sampler(torch.zeros(400, 16, 2, 2), [f"1/row/{i}" for i in range(400)])
    sigmas = draw.timesteps / 1000
    assert draw.timesteps.dtype == torch.float32 and (sigmas > 0).all() and (sigmas <= 1).all()
    assert (draw.timesteps != draw.timesteps.round()).any()  # floats, not DDPM's integer steps
    assert abs(sigmas.median().item() - 0.75) < 0.05  # shift 3 moves the sigmoid's median 0.5 to 0.75


def test_fp8_storage_keeps_norms_and_t5_output_layer_and_the_transformer_still_runs(tiny_flux_dir):
    """fp8_base's storage (a CUDA feature) on the FLUX family, checked under the CPU's bf16 autocast."""
    from trainer.families.flux import FluxFamily
    from trainer.fp8 import FP8, store_frozen_weights_in_fp8

    settings = TrainingSettings(flux1_checkbox=True, pretrained_model_name_or_path=str(tiny_flux_dir),
                                t5xxl_max_token_length=16)
    family = FluxFamily(settings)
    family.load(settings, torch.bfloat16, torch.device("cpu"), lambda *args: None)
    assert store_frozen_weights_in_fp8(family, torch.bfloat16) > 0
    transformer, t5 = family.unet, family.text_encoders[1]
    assert transformer.double_blocks[0].img_attn.qkv.weight.dtype == FP8
    assert transformer.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.bfloat16
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16
    assert t5.encoder.final_layer_norm.weight.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cond = family.encode_prompt(family.tokenize(["a photo of sks dog"]))
        pred = family.predict(torch.randn(1, 16, 8, 8, dtype=torch.bfloat16), torch.tensor([500.0]), cond, None)
    assert pred.shape == (1, 16, 8, 8) and torch.isfinite(pred).all()


def test_the_gui_model_pick_ticks_flux_for_flux_models_and_unticks_it_for_sd(tiny_flux_dir, tiny_flux_files,
                                                                              tiny_sd1_dir):
    from app.model_pick import on_model_path

    for model in (tiny_flux_dir, tiny_flux_files["transformer"]):
        values, note = on_model_path(str(model))
        assert values["flux1_checkbox"] is True and not values["sdxl"] and not values["v2"]
        assert note == "Detected FLUX.1 from the model."
    values, _ = on_model_path(str(tiny_sd1_dir))
    assert values["flux1_checkbox"] is False


def test_sample_prompts_take_sd_scripts_guidance_option():
    from trainer.families.flux_sampling import SAMPLE_GUIDANCE, flux_schedule
    from trainer.inference.prompts import parse_prompt_line, prompt_from_dict

    assert parse_prompt_line("a dog --g 2.5 --l 1 --s 4").guidance == 2.5
    assert parse_prompt_line("a dog --s 4").guidance is None and SAMPLE_GUIDANCE == 3.5
    assert prompt_from_dict({"prompt": "a dog", "guidance_scale": 4}).guidance == 4
    dev, schnell = flux_schedule(4, 1024, shift=True), flux_schedule(4, 1024, shift=False)
    assert dev[0] == schnell[0] == 1.0 and dev[-1] == schnell[-1] == 0.0 and dev[2] > schnell[2] == 0.5


def test_network_args_are_kohya_ss_flux1_ones():
    from trainer.network.build import network_args
    from trainer.network_spec import NetworkSpec

    settings = TrainingSettings(flux1_checkbox=True, LoRA_type="Flux1", block_dims="1,2,3", rank_dropout=0.1,
                                split_mode=True, train_t5xxl=True, loraplus_lr_ratio=4)
    spec = NetworkSpec.from_settings(settings)
    assert spec.network_module == "networks.lora_flux" and spec.blocks is None
    # kohya_ss: the Flux1 variables, rank/module dropout and LoRA+; no block settings (networks.lora_flux has none)
    args = network_args(settings, spec)
    # (the block selections' default "all" is passed too: tests/test_flux_network_args.py)
    assert args == {"train_double_block_indices": "all", "train_single_block_indices": "all", "train_blocks": "single",
                    "train_t5xxl": "True", "rank_dropout": "0.1", "loraplus_lr_ratio": "4"}
    assert list(args) == ["train_double_block_indices", "train_single_block_indices", "train_blocks", "train_t5xxl",
                          "rank_dropout", "loraplus_lr_ratio"]  # kohya_ss's order


def test_t5xxl_lr_gives_the_t5_lora_its_own_optimizer_group(tiny_flux_dir, tmp_path):
    from trainer.families.flux import FluxFamily
    from trainer.network.build import learning_rates
    from trainer.network.network import LoRANetwork
    from trainer.network_spec import NetworkSpec
    from trainer.preflight import check

    settings = TrainingSettings(flux1_checkbox=True, LoRA_type="Flux1", pretrained_model_name_or_path=str(tiny_flux_dir),
                                train_t5xxl=True, unet_lr=1e-4, text_encoder_lr=5e-5, t5xxl_lr=2e-5)
    family = FluxFamily(settings)
    family.load(settings, torch.float32, torch.device("cpu"), lambda *args: None)
    spec = NetworkSpec.from_settings(settings)
    network = LoRANetwork.build(family.lora_targets(), spec)
    groups = {g["name"]: (g["lr"], len(g["params"])) for g in network.param_groups(learning_rates(settings),
                                                                                   prefix_lrs=spec.prefix_lrs)}
    # 2 double blocks x 10 Linears, 2 single x 3, CLIP-L 2 layers x 6, T5 2 blocks x 7; lora_down and lora_up each
    assert groups == {"unet": (1e-4, 2 * 10 * 2 + 2 * 3 * 2), "textencoder": (5e-5, 2 * 6 * 2),
                      "textencoder lora_te3": (2e-5, 2 * 7 * 2)}
    refused = check(settings.model_copy(update={"text_encoder_lr": 0, "output_dir": str(tmp_path)}), deep=False)
    assert any(p.field == "t5xxl_lr" for p in refused.errors)


def test_a_transformer_file_with_the_full_checkpoint_prefix_loads(tiny_flux_files, tmp_path):
    """Some FLUX files carry BFL's keys under ``model.diffusion_model.``, as full checkpoints do."""
    from safetensors.torch import load_file, save_file

    from trainer.checkpoints import detect
    from trainer.families.flux_load import load_transformer

    plain = load_file(str(tiny_flux_files["transformer"]))
    prefixed = tmp_path / "flux1-prefixed.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in plain.items()}, str(prefixed))
    assert detect(prefixed).family == "flux1"
    loaded = load_transformer(prefixed, torch.float32).state_dict()
    assert set(loaded) == set(plain) and all(torch.equal(loaded[k], plain[k]) for k in plain)
