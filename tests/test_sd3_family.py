"""SD 3 / 3.5 family pieces: the SAI-layout MMDiT against diffusers' SD3Transformer2DModel, the key map against
diffusers' own single-file converter, sd-scripts' SD3 timestep draw and target, detection, loading in every layout,
and the check."""
from __future__ import annotations

import pytest
import torch

from sd3_support import tiny_sd35_dir, tiny_sd3_dir, tiny_sd3_files, tiny_sd3_fp8_files  # noqa: F401
from trainer.families.flow_matching import FlowConfig, FlowMatchingSchedule

TINY = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=32, out_channels=16,
            pos_embed_max_size=16)
SD35 = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}


def _diffusers_mmdit(extra: dict):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY, **extra).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("extra", [{}, SD35], ids=["sd3", "sd3.5"])
def test_sai_mmdit_computes_what_diffusers_does_on_the_same_weights(extra):
    from trainer.families.sd3_weights import config_from_diffusers, config_from_sai_shapes, diffusers_to_sai
    from trainer.models.sd3 import MMDiT

    ref = _diffusers_mmdit(extra)
    sai = diffusers_to_sai(ref.state_dict())
    config = config_from_sai_shapes({k: tuple(v.shape) for k, v in sai.items()})
    assert config == config_from_diffusers(dict(ref.config))
    model = MMDiT(config).eval()
    model.load_state_dict(sai, strict=True)
    x, t = torch.randn(2, 16, 8, 12), torch.tensor([100.0, 900.0])
    y, context = torch.randn(2, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = ref(x, context, y, t).sample
        got = model(x, t, y, context)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("extra", [{}, SD35], ids=["sd3", "sd3.5"])
def test_key_map_is_the_inverse_of_diffusers_single_file_converter(extra):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from trainer.families.sd3_weights import SAI_PREFIX, diffusers_to_sai

    original = _diffusers_mmdit(extra).state_dict()
    sai = {SAI_PREFIX + k: v.clone() for k, v in diffusers_to_sai(original).items()}
    back = convert_sd3_transformer_checkpoint_to_diffusers(sai)
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def _sd3_schedule(**kw) -> FlowMatchingSchedule:
    return FlowMatchingSchedule(FlowConfig(timestep_sampling="sd3", model_prediction_type="sigma_scaled",
                                           sample_target=True, **kw))


def test_sd3_timesteps_follow_sd_scripts_draw():
    from types import SimpleNamespace

    noise = SimpleNamespace(min_timestep=0, max_timestep=1000)
    logit = _sd3_schedule(weighting_scheme="logit_normal").sample_timesteps(4000, noise, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(logit, logit.floor()) and logit.min() >= 0 and logit.max() < 1000
    assert abs(logit.float().mean().item() - 500) < 15 and logit.std() < 250  # sigmoid(N(0,1)) gathers at the middle
    uniform = _sd3_schedule(weighting_scheme="uniform").sample_timesteps(4000, noise, torch.Generator().manual_seed(0), "cpu")
    assert uniform.std() > 270  # 1000/sqrt(12) = 289
    # training_shift > 1 moves the draws to the noisy end; min/max timestep bound them as sd-scripts does
    shifted = _sd3_schedule(weighting_scheme="logit_normal", training_shift=3.0).sample_timesteps(
        4000, noise, torch.Generator().manual_seed(0), "cpu")
    assert shifted.mean() > logit.mean() + 100
    bounded = _sd3_schedule().sample_timesteps(500, SimpleNamespace(min_timestep=200, max_timestep=300),
                                               torch.Generator().manual_seed(0), "cpu")
    assert bounded.min() >= 200 and bounded.max() < 300


def test_sd3_target_is_the_clean_latents_and_the_prediction_is_preconditioned():
    schedule = _sd3_schedule()
    latents, noise, t = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([250.0, 750.0])
    noisy = schedule.add_noise(latents, noise, t)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - sigma) * latents + sigma * noise)
    assert torch.equal(schedule.target(latents, noise, t), latents)
    velocity = noise - latents  # a perfect model's output: the preconditioned prediction is x_0 exactly
    assert torch.allclose(schedule.apply_prediction_type(velocity, noisy, t), latents, atol=1e-6)
    assert torch.equal(FlowMatchingSchedule(FlowConfig()).target(latents, noise, t), noise - latents)  # FLUX as it was


def test_detects_sai_files_and_diffusers_folders_as_sd3(tiny_sd3_dir, tiny_sd3_files):
    from trainer.checkpoints import detect

    for path in (tiny_sd3_dir, tiny_sd3_files["full"], tiny_sd3_files["bare"]):
        info = detect(path)
        assert info.family == "sd3" and info.ok, (path, info.problems)


def _settings(**values):
    from types import SimpleNamespace

    base = {"pretrained_model_name_or_path": "", "sd3_clip_l": "", "clip_g": "", "sd3_t5xxl": "", "vae": ""}
    return SimpleNamespace(**{**base, **values})


def _prediction(settings) -> torch.Tensor:
    from trainer.families.sd3 import SD3Family

    family = SD3Family(_settings(weighting_scheme="logit_normal", logit_mean=0, logit_std=1, mode_scale=1.29,
                                 sd3_cache_text_encoder_outputs=False))
    family.load(settings, torch.float32, torch.device("cpu"), lambda *_: None)
    with torch.no_grad():
        cond = family.encode_prompt(family.tokenize(["a photo of sks dog"]))
        x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        return family.predict(x, torch.tensor([500.0]), cond, None)


def test_every_layout_loads_the_same_model(tiny_sd3_dir, tiny_sd3_files, tiny_sd3_fp8_files):
    files, fp8 = tiny_sd3_files, tiny_sd3_fp8_files
    separate = {"sd3_clip_l": str(files["clip_l"]), "clip_g": str(files["clip_g"]), "sd3_t5xxl": str(files["t5xxl"])}
    reference = _prediction(_settings(pretrained_model_name_or_path=str(tiny_sd3_dir)))
    for settings in (_settings(pretrained_model_name_or_path=str(files["full"])),
                     _settings(pretrained_model_name_or_path=str(files["bare"]), **separate)):
        assert torch.allclose(_prediction(settings), reference, atol=1e-5)
    upcast = _prediction(_settings(pretrained_model_name_or_path=str(fp8["bare"]), sd3_clip_l=str(fp8["clip_l"]),
                                   clip_g=str(fp8["clip_g"]), sd3_t5xxl=str(fp8["t5xxl"])))
    assert upcast.shape == reference.shape and torch.isfinite(upcast).all()


def test_a_sai_file_without_encoders_names_the_missing_field(tiny_sd3_files):
    from trainer.families.sd3_load import SD3LoadError, load_sd3
    from trainer.problems import NekoyaError

    with pytest.raises(SD3LoadError, match="no CLIP-L text encoder.*set sd3_clip_l") as caught:
        load_sd3(_settings(pretrained_model_name_or_path=str(tiny_sd3_files["bare"])), torch.float32)
    assert isinstance(caught.value, NekoyaError) and caught.value.field == "sd3_clip_l"


def test_the_check_names_missing_encoder_fields_before_loading(tiny_sd3_files, tmp_path):
    from test_train import tiny_settings
    from trainer.preflight import check

    images = tmp_path / "img" / "1_sks dog"
    images.mkdir(parents=True)
    settings = tiny_settings(tiny_sd3_files["bare"], tmp_path / "img", tmp_path / "out", sd3_checkbox=True,
                             clip_g=str(tiny_sd3_files["t5xxl"]))
    report = check(settings, deep=False)
    fields = {p.field for p in report.errors}
    assert {"sd3_clip_l", "clip_g", "sd3_t5xxl"} <= fields, [p.message for p in report.errors]
    wrong = next(p for p in report.errors if p.field == "clip_g")
    assert "is not a CLIP-G file" in wrong.message


def test_a_picked_sd3_model_ticks_sd3_and_shows_its_section(tiny_sd3_files, tiny_sd3_dir):
    from app import model_pick
    from trainer.families import spec_for_settings
    from trainer.settings import TrainingSettings, setting_infos

    for path in (tiny_sd3_files["bare"], tiny_sd3_dir):
        values, note = model_pick.on_model_path(str(path))
        assert values["sd3_checkbox"] and not values["flux1_checkbox"] and not values["sdxl"], values
        assert "SD 3" in note
    section = {info.key for info in setting_infos() if info.section == "SD3"}
    assert {"weighting_scheme", "sd3_clip_l", "clip_g", "sd3_t5xxl"} <= section
    assert all(setting_infos_by_key(key).is_visible({"sd3_checkbox": True}) and
               not setting_infos_by_key(key).is_visible({"sd3_checkbox": False}) for key in section)
    assert spec_for_settings(TrainingSettings(sd3_checkbox=True)).key == "sd3"
    assert spec_for_settings(TrainingSettings(sdxl=True)).key == "sdxl"


def setting_infos_by_key(key: str):
    from trainer.settings import setting_info

    return setting_info(key)


def test_the_check_refuses_sd3_with_another_family_ticked(tiny_sd3_dir, tmp_path):
    from test_train import tiny_settings
    from trainer.preflight import check

    (tmp_path / "img" / "1_sks dog").mkdir(parents=True)
    settings = tiny_settings(tiny_sd3_dir, tmp_path / "img", tmp_path / "out", sd3_checkbox=True, flux1_checkbox=True)
    errors = check(settings, deep=False).errors
    assert any(p.field == "flux1_checkbox" and "SD 3 and FLUX.1 (flux1_checkbox) are both ticked" in p.message for p in errors)


def test_settings_sd_scripts_sd3_trainer_does_not_use_are_off_for_the_run(tiny_sd3_dir, tmp_path):
    from test_train import tiny_settings
    from trainer.preflight import check

    (tmp_path / "img" / "1_sks dog").mkdir(parents=True)
    settings = tiny_settings(tiny_sd3_dir, tmp_path / "img", tmp_path / "out", sd3_checkbox=True, min_snr_gamma=5,
                             noise_offset=0.1, ip_noise_gamma=0.1, down_lr_weight="0,0,0,0,0,0,0,0,0,0,0,0", weighting_scheme="cosmap", bucket_reso_steps=48, enable_bucket=True,
                             blocks_to_swap=4)
    result = check(settings, deep=False)
    notes = {p.field: p for p in result.by_severity("note")}
    assert "is not used for SD3" in notes["min_snr_gamma"].message and "noise_offset" in notes
    adjusted = result.adjusted(settings)
    assert adjusted.min_snr_gamma == 0 and adjusted.noise_offset == 0 and settings.min_snr_gamma == 5
    assert adjusted.ip_noise_gamma == 0  # sd-scripts' SD3 noisy input has no input-perturbation noise
    assert adjusted.down_lr_weight == "" and "networks.lora_sd3" in notes["down_lr_weight"].message
    assert not any(p.field == "weighting_scheme" for p in result.warnings)  # cosmap weights the loss as sd-scripts
    assert any(p.field == "blocks_to_swap" for p in result.warnings)
    assert any(p.field == "bucket_reso_steps" for p in result.errors)


def test_fp8_storage_keeps_qk_norms_and_the_mmdit_still_runs(tiny_sd35_dir):
    """fp8_base's storage (a CUDA feature) on an SD 3.5 model, checked under the CPU's bf16 autocast."""
    from trainer.families.sd3 import SD3Family
    from trainer.fp8 import FP8, store_frozen_weights_in_fp8
    from trainer.settings import TrainingSettings

    settings = TrainingSettings(sd3_checkbox=True, pretrained_model_name_or_path=str(tiny_sd35_dir))
    family = SD3Family(settings)
    family.load(settings, torch.bfloat16, torch.device("cpu"), lambda *args: None)
    assert store_frozen_weights_in_fp8(family, torch.bfloat16) > 0
    block = family.unet.joint_blocks[0].x_block
    assert block.attn.qkv.weight.dtype == FP8 and block.attn2.qkv.weight.dtype == FP8
    assert block.attn.ln_q.weight.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cond = family.encode_prompt(family.tokenize(["a photo of sks dog"]))
        pred = family.predict(torch.randn(1, 16, 8, 8, dtype=torch.bfloat16), torch.tensor([500.0]), cond, None)
    assert pred.shape == (1, 16, 8, 8) and torch.isfinite(pred).all()


def test_model_type_names_sd3_medium_and_both_sd35s_as_sd_scripts():
    from types import SimpleNamespace

    from trainer.families.sd3 import SD3Family

    family = SD3Family(_settings(weighting_scheme="logit_normal", logit_mean=0, logit_std=1, mode_scale=1.29,
                                 sd3_cache_text_encoder_outputs=False))
    for qk_norm, self_attn, expected in ((None, (), "medium"), ("rms", (), "5-large"), ("rms", (0, 1), "5-medium")):
        family.unet = SimpleNamespace(config=SimpleNamespace(qk_norm=qk_norm, x_block_self_attn_layers=self_attn))
        version = family.version_metadata()
        assert version.architecture == f"stable-diffusion-3-{expected}" and version.lora_module == "networks.lora_sd3"


def test_the_vae_setting_replaces_the_models_own(tiny_sd3_dir, tiny_sd3_files, tmp_path):
    from safetensors.torch import load_file, save_file

    from trainer.families.sd3_load import load_sd3

    vae_file = tmp_path / "sd3_vae.safetensors"
    state = {k: v * 0.5 for k, v in load_file(str(tiny_sd3_files["full"])).items() if k.startswith("first_stage_model.")}
    save_file(state, str(vae_file))
    for base in (tiny_sd3_dir, tiny_sd3_files["full"]):
        vae = load_sd3(_settings(pretrained_model_name_or_path=str(base), vae=str(vae_file)), torch.float32).vae
        decoder = vae.decoder.conv_in.weight
        assert torch.allclose(decoder, state["first_stage_model.decoder.conv_in.weight"])
        assert vae.config.scaling_factor == 1.5305 and vae.config.shift_factor == 0.0609


def test_the_check_names_a_missing_t5_tokenizer_before_loading(tiny_sd3_files, tmp_path):
    import shutil

    from test_train import tiny_settings
    from trainer.preflight import check

    (tmp_path / "img" / "1_sks dog").mkdir(parents=True)
    full = tmp_path / "sd3_incl_clips_t5.safetensors"
    shutil.copy(tiny_sd3_files["full"], full)  # without its <file>.tokenizers/ folder
    t5 = tmp_path / "t5" / "t5xxl.safetensors"
    t5.parent.mkdir()
    shutil.copy(tiny_sd3_files["t5xxl"], t5)
    for extra in ({}, {"sd3_t5xxl": str(t5)}):
        settings = tiny_settings(full, tmp_path / "img", tmp_path / "out", sd3_checkbox=True, **extra)
        errors = [p for p in check(settings, deep=False).errors if p.field == "sd3_t5xxl"]
        assert errors and "no T5 tokenizer" in errors[0].message and "never downloads" in errors[0].message
