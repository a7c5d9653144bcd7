"""The training loss: per-sample error and its weightings (min-SNR, v-pred scaling,
debiased estimation, prior loss weight), as sd-scripts computes them. Pure functions."""
from __future__ import annotations

import math
from typing import Any
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SNR_CAP = 1000.0  # snr is infinite at t=0; sd-scripts caps it here for the scalings


def huber_c(loss_type: str, schedule: str, c: float, scale: float, snr: torch.Tensor,
            timesteps: torch.Tensor, num_steps: int = 1000) -> torch.Tensor | None:
    """Per-sample Huber threshold for huber / smooth_l1 losses, None for the others."""
    if loss_type not in ("huber", "smooth_l1"):
        return None
    if schedule == "exponential":
        alpha = -math.log(c) / num_steps
        return torch.exp(-alpha * timesteps.float()) * scale
    if schedule == "snr":
        sigmas = (1.0 / snr) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    return torch.full(timesteps.shape, c * scale, device=timesteps.device)


def _l2(pred, target, c):
    return F.mse_loss(pred, target, reduction="none")


def _l1(pred, target, c):
    return F.l1_loss(pred, target, reduction="none")


def _huber(pred, target, c):
    c = c.view(-1, *([1] * (pred.dim() - 1)))
    return 2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)


def _smooth_l1(pred, target, c):
    c = c.view(-1, *([1] * (pred.dim() - 1)))
    return 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)


LOSS_FUNCTIONS = {"l2": _l2, "l1": _l1, "huber": _huber, "smooth_l1": _smooth_l1}


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    c: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Element loss in fp32, averaged over every dimension but the batch: shape (B,).

    ``mask`` (B, H, W) in [0, 1] (masked_loss) weights each latent pixel, as sd-scripts' ``apply_masked_loss``:
    area-downsampled to the latent size and multiplied into the element loss before the mean (the mean is
    still over every element, so a half-masked image counts half)."""
    if loss_type not in LOSS_FUNCTIONS:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_FUNCTIONS)}")
    loss = LOSS_FUNCTIONS[loss_type](pred.float(), target.float(), c)
    if mask is not None:
        loss = loss * latent_mask(mask, loss.shape[2:]).to(loss.device)
    return loss.mean(dim=tuple(range(1, loss.dim())))


def latent_mask(mask: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """(B, H, W) pixel mask -> (B, 1, h, w) at the latent size, by area averaging (sd-scripts' ``mode="area"``)."""
    return F.interpolate(mask.float().unsqueeze(1), size=tuple(size), mode="area")


@dataclass(frozen=True)
class LossWeighting:
    v_prediction: bool = False
    min_snr_gamma: float = 0.0
    scale_v_pred_loss_like_noise_pred: bool = False
    debiased_estimation: bool = False
    v_pred_like_loss: float = 0.0

    @classmethod
    def from_settings(cls, settings, v_prediction: bool) -> "LossWeighting":
        return cls(
            v_prediction=v_prediction,
            min_snr_gamma=float(settings.min_snr_gamma or 0.0),
            scale_v_pred_loss_like_noise_pred=bool(settings.scale_v_pred_loss_like_noise_pred) and v_prediction,
            debiased_estimation=bool(settings.debiased_estimation_loss),
            v_pred_like_loss=float(getattr(settings, "v_pred_like_loss", 0.0) or 0.0),
        )

    @property
    def needs_snr(self) -> bool:
        return bool(self.min_snr_gamma or self.scale_v_pred_loss_like_noise_pred or self.debiased_estimation
                    or self.v_pred_like_loss)


def snr_weights(snr: torch.Tensor, w: LossWeighting) -> torch.Tensor:
    """Per-sample multipliers from the signal-to-noise ratio of each sample's timestep."""
    weight = torch.ones_like(snr)
    if w.min_snr_gamma:
        clipped = torch.clamp(snr, max=w.min_snr_gamma)
        weight = weight * (clipped / (snr + 1) if w.v_prediction else clipped / snr)
    capped = torch.clamp(snr, max=SNR_CAP)
    if w.scale_v_pred_loss_like_noise_pred:
        weight = weight * capped / (capped + 1)
    if w.v_pred_like_loss:  # sd-scripts: loss + loss / (snr / (snr + 1)) * v_pred_like_loss
        weight = weight * (1 + w.v_pred_like_loss * (capped + 1) / capped)
    if w.debiased_estimation:
        weight = weight * (1 / (capped + 1) if w.v_prediction else 1 / torch.sqrt(capped))
    return weight


def training_loss(per_sample: torch.Tensor, sample_weights: torch.Tensor, snr: torch.Tensor | None,
                  weighting: LossWeighting) -> torch.Tensor:
    """Mean over the batch of the per-sample loss times prior-loss and SNR weights."""
    loss = per_sample * sample_weights
    if weighting.needs_snr:
        loss = loss * snr_weights(snr, weighting)
    return loss.mean()


def family_sample_weights(weights: torch.Tensor, schedule: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """The batch's sample weights times the family's own per-timestep loss weights where its schedule has them
    (sd-scripts' weighting_scheme sigma_sqrt / cosmap for SD3 and FLUX sigma_scaled predictions)."""
    extra = getattr(schedule, "prediction_weighting", None)
    factor = extra(timesteps) if extra is not None else None
    return weights if factor is None else weights * factor.to(weights)
