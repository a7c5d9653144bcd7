"""Noise sampling, the DDPM schedule and loss weighting: pure functions."""
from __future__ import annotations

import pytest
import torch

from trainer.loss import LossWeighting, huber_c, per_sample_loss, snr_weights, training_loss
from trainer.noise import NoiseConfig, NoiseSchedule, noisy_latents, offset_noise, pyramid_noise, sample_noise, sample_timesteps
from trainer.settings import TrainingSettings


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.scaled_linear()


def test_schedule_matches_diffusers_ddpm(schedule):
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False)
    torch.testing.assert_close(schedule.alphas_cumprod, ddpm.alphas_cumprod.float())
    x, n = torch.randn(3, 4, 8, 8, generator=gen(1)), torch.randn(3, 4, 8, 8, generator=gen(2))
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(schedule.add_noise(x, n, t), ddpm.add_noise(x, n, t))
    torch.testing.assert_close(schedule.velocity(x, n, t), ddpm.get_velocity(x, n, t))
    a = ddpm.alphas_cumprod[t]
    torch.testing.assert_close(schedule.snr(t), (a / (1 - a)).float())


@pytest.mark.parametrize("v_parameterization", [False, True])
def test_family_schedule_trains_the_target_its_prediction_type_says(v_parameterization):
    from trainer.families import create_family

    family = create_family(TrainingSettings(v2=True, v_parameterization=v_parameterization))
    schedule = family.noise_schedule("cpu")
    x, n, t = torch.randn(2, 4, 8, 8, generator=gen(1)), torch.randn(2, 4, 8, 8, generator=gen(2)), torch.tensor([10, 900])
    expected = schedule.velocity(x, n, t) if v_parameterization else n
    torch.testing.assert_close(schedule.target(x, n, t), expected)
    torch.testing.assert_close(schedule.alphas_cumprod, NoiseSchedule.scaled_linear().alphas_cumprod)
    assert torch.equal(family.unscale_latents(family.scale_latents(x)), x * family.latent_scale / family.latent_scale)


def test_timesteps_range_and_fixed():
    t = sample_timesteps(1000, 100, 200, gen(), "cpu")
    assert t.min() >= 100 and t.max() < 200 and len(set(t.tolist())) > 50
    assert sample_timesteps(4, 300, 300, gen(), "cpu").tolist() == [300] * 4
    assert torch.equal(sample_timesteps(8, 0, 1000, gen(5), "cpu"), sample_timesteps(8, 0, 1000, gen(5), "cpu"))


def test_offset_noise_is_constant_per_channel():
    latents = torch.randn(2, 4, 8, 8, generator=gen(1))
    base = torch.zeros(2, 4, 8, 8)
    shifted = offset_noise(base, latents, 0.1, gen(3))
    per_channel = shifted.flatten(2)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel))
    assert 0 < shifted.abs().max() < 1.0
    # random strength scales the same draw down by U(0, 1)
    weaker = offset_noise(base, latents, 0.1, gen(3), random_strength=True)
    assert weaker.abs().max() <= shifted.abs().max() * 1.5
    adaptive = offset_noise(base, latents + 5.0, 0.1, gen(3), adaptive_scale=0.5)
    assert adaptive.abs().mean() > shifted.abs().mean()


def test_pyramid_noise_normalised_and_seeded():
    noise = torch.randn(2, 4, 32, 32, generator=gen(1))
    a = pyramid_noise(noise, 6, 0.3, gen(2))
    b = pyramid_noise(noise, 6, 0.3, gen(2))
    assert a.shape == noise.shape and torch.equal(a, b)
    assert a.std().item() == pytest.approx(1.0, abs=1e-4)
    assert not torch.allclose(a, noise / noise.std())


def test_noise_config_from_settings_follows_offset_type():
    original = NoiseConfig.from_settings(TrainingSettings(noise_offset=0.1, multires_noise_iterations=6))
    assert original.offset == 0.1 and original.multires_iterations == 0
    multires = NoiseConfig.from_settings(TrainingSettings(noise_offset_type="Multires", noise_offset=0.1, multires_noise_iterations=6))
    assert multires.offset == 0.0 and multires.multires_iterations == 6
    latents = torch.randn(2, 4, 8, 8)
    assert torch.equal(sample_noise(latents, multires, gen(4)), sample_noise(latents, multires, gen(4)))
    assert not torch.equal(sample_noise(latents, multires, gen(4)), sample_noise(latents, NoiseConfig(), gen(4)))


def test_ip_noise_perturbs_input_only(schedule):
    x, n = torch.randn(2, 4, 8, 8, generator=gen(1)), torch.randn(2, 4, 8, 8, generator=gen(2))
    t = torch.tensor([10, 900])
    plain = noisy_latents(schedule, x, n, t, NoiseConfig(), gen(3))
    torch.testing.assert_close(plain, schedule.add_noise(x, n, t))
    assert not torch.allclose(noisy_latents(schedule, x, n, t, NoiseConfig(ip_noise_gamma=0.1), gen(3)), plain)


def test_loss_types():
    pred, target = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    assert per_sample_loss(pred, target, "l2").tolist() == [2.5]
    assert per_sample_loss(pred, target, "l1").tolist() == [1.5]
    c = torch.tensor([0.5])
    expected = (2 * 0.5 * ((torch.tensor([1.0, 4.0]) + 0.25).sqrt() - 0.5)).mean()
    torch.testing.assert_close(per_sample_loss(pred, target, "huber", c), expected.view(1))
    torch.testing.assert_close(per_sample_loss(pred, target, "smooth_l1", c), (expected / 0.5).view(1))
    with pytest.raises(ValueError):
        per_sample_loss(pred, target, "l3")


def test_huber_c_schedules(schedule):
    t = torch.tensor([0, 999])
    snr = schedule.snr(t)
    assert huber_c("l2", "snr", 0.1, 1.0, snr, t) is None
    const = huber_c("huber", "constant", 0.1, 2.0, snr, t)
    assert const.tolist() == pytest.approx([0.2, 0.2])
    exp = huber_c("huber", "exponential", 0.1, 1.0, snr, t)
    assert exp[0].item() == pytest.approx(1.0) and exp[1].item() == pytest.approx(0.1, rel=0.01)
    by_snr = huber_c("smooth_l1", "snr", 0.1, 1.0, snr, t)
    assert by_snr[0] > by_snr[1] >= 0.1


def test_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    eps = snr_weights(snr, LossWeighting(min_snr_gamma=5.0))
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 0.1]))
    v = snr_weights(snr, LossWeighting(v_prediction=True, min_snr_gamma=5.0))
    torch.testing.assert_close(v, torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    torch.testing.assert_close(snr_weights(snr, LossWeighting(debiased_estimation=True)), 1 / snr.sqrt())
    torch.testing.assert_close(
        snr_weights(snr, LossWeighting(v_prediction=True, scale_v_pred_loss_like_noise_pred=True)), snr / (snr + 1)
    )
    assert not LossWeighting().needs_snr


def test_training_loss_applies_prior_weights():
    per_sample = torch.tensor([1.0, 3.0])
    assert training_loss(per_sample, torch.tensor([1.0, 0.5]), None, LossWeighting()).item() == pytest.approx(1.25)
    weighted = training_loss(per_sample, torch.ones(2), torch.tensor([0.5, 50.0]), LossWeighting(min_snr_gamma=5.0))
    assert weighted.item() == pytest.approx((1.0 + 3.0 * 0.1) / 2)


def test_zero_terminal_snr_matches_diffusers_rescale():
    """sd-scripts' --zero_terminal_snr is Lin et al.'s rescale; diffusers implements the same on the betas."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    plain = NoiseSchedule.scaled_linear(1000, 0.00085, 0.012)
    fixed = NoiseSchedule.scaled_linear(1000, 0.00085, 0.012, zero_terminal_snr=True)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1.0 - rescale_zero_terminal_snr(betas), dim=0).float()
    torch.testing.assert_close(fixed.alphas_cumprod, expected, atol=1e-6, rtol=1e-5)
    assert fixed.alphas_cumprod[-1] == 0 and fixed.alphas_cumprod[0] == pytest.approx(plain.alphas_cumprod[0])


def test_ip_noise_random_strength_draws_up_to_gamma_from_the_run_generator(schedule):
    x, n = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    t = torch.tensor([999])
    config = NoiseConfig(ip_noise_gamma=0.5, ip_noise_gamma_random_strength=True)
    full = noisy_latents(schedule, x, n, t, NoiseConfig(ip_noise_gamma=0.5), gen(3))
    drawn = noisy_latents(schedule, x, n, t, config, gen(3))
    again = noisy_latents(schedule, x, n, t, config, gen(3))
    torch.testing.assert_close(drawn, again)
    ratio = (drawn.std() / full.std()).item()  # the extra noise is strength * randn: its size scales with it
    assert 0 < ratio < 1


def test_v_pred_like_loss_weight_is_sd_scripts_formula():
    from trainer.loss import LossWeighting, snr_weights

    snr = torch.tensor([0.01, 1.0, 50.0, float("inf")])
    weight = snr_weights(snr, LossWeighting(v_pred_like_loss=0.2))
    capped = torch.clamp(snr, max=1000.0)
    scale = capped / (capped + 1)
    loss = torch.ones(4)
    torch.testing.assert_close(loss * weight, loss + loss / scale * 0.2)  # add_v_prediction_like_loss


def test_flow_matching_families_weight_each_samples_loss_by_their_scheme():
    from trainer.families.flow_matching import FlowConfig, FlowMatchingSchedule
    from trainer.loss import family_sample_weights

    timesteps = torch.tensor([250.0, 500.0, 800.0])
    weights = torch.tensor([1.0, 0.5, 1.0])
    sqrt = FlowMatchingSchedule(FlowConfig(model_prediction_type="sigma_scaled", weighting_scheme="sigma_sqrt"))
    assert torch.allclose(family_sample_weights(weights, sqrt, timesteps), weights * (timesteps / 1000) ** -2)
    for plain in (FlowMatchingSchedule(FlowConfig(weighting_scheme="logit_normal")), NoiseSchedule.scaled_linear()):
        assert torch.equal(family_sample_weights(weights, plain, timesteps), weights)


def test_flux_shift_shifts_by_each_samples_own_latent_size():
    from trainer.families.flow_matching import FlowConfig, FlowMatchingSchedule
    from trainer.noise_sampling import RandomNoise

    sampler = RandomNoise(NoiseConfig(), FlowMatchingSchedule(FlowConfig(timestep_sampling="flux_shift")), seed=1)
    keys = [f"k/{i}" for i in range(400)]
    small = sampler(torch.zeros(400, 16, 32, 32), keys).timesteps  # 256 px: 256 packed tokens, mu 0.5
    large = sampler(torch.zeros(400, 16, 128, 128), keys).timesteps  # 1024 px: 4096 tokens, mu 1.15
    assert large.mean() > small.mean() + 50  # a larger image is trained at more noise, as sd-scripts
