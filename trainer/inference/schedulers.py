"""Sampler names (kohya's ``sample_sampler`` choices) -> diffusers schedulers.

As sd-scripts' ``get_my_scheduler``: every scheduler gets the betas the family
trained with (its spec's ``schedule``), ``v_prediction`` for v-models and
``clip_sample`` on where the scheduler has it.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np

from trainer.families import DiffusionSchedule

# canonical name -> (diffusers class, extra init arguments)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    # without PRK warm-up steps, as SD's own scheduler config (PRK fails below 4 steps)
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # first-order DPM-Solver cannot end on sigma 0 in current diffusers
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a"}
SAMPLER_NAMES = tuple(SCHEDULERS) + tuple(ALIASES)



def canonical_sampler(name: str) -> str:
    """The table name of ``name`` (case-insensitive, k_ aliases); ValueError when unknown."""
    key = (name or "").strip().lower()
    key = ALIASES.get(key, key)
    if key not in SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    return key


def make_scheduler(name: str, v_prediction: bool, clip_sample: bool = True,
                   betas: DiffusionSchedule = DiffusionSchedule()):
    """A fresh scheduler for one image (schedulers keep per-run state).

    ``clip_sample`` (DDIM only) clips the predicted latents to [-1, 1] as sd-scripts'
    samples do; Try-it turns it off, as other UIs do.
    """
    class_name, extra = SCHEDULERS[canonical_sampler(name)]
    cls = _scheduler_class(class_name)
    args = {**betas.scheduler_arguments(), **extra, "prediction_type": "v_prediction" if v_prediction else "epsilon"}
    with warnings.catch_warnings():  # diffusers marks first-order "dpmsolver" deprecated; kohya offers it
        warnings.simplefilter("ignore", FutureWarning)
        scheduler = cls(**args)
    if hasattr(scheduler.config, "clip_sample"):
        scheduler.register_to_config(clip_sample=clip_sample)
    return scheduler


def _scheduler_class(class_name: str):
    import diffusers

    if class_name == "LMSDiscreteScheduler":
        return _lms_without_scipy()
    return getattr(diffusers, class_name)


@functools.lru_cache(maxsize=None)
def _lms_without_scipy():
    # diffusers.LMSDiscreteScheduler itself is a stub when scipy is missing; the module is not
    from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler

    class LMSWithoutScipy(LMSDiscreteScheduler):
        """diffusers integrates the LMS coefficients with scipy, which Nekoya does not install.

        The integrand is a polynomial of degree order-1, so Gauss-Legendre with ``order``
        nodes integrates it exactly.
        """

        def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
            sigmas = [float(s) for s in self.sigmas]
            others = [sigmas[t - k] for k in range(order) if k != current_order]
            anchor = sigmas[t - current_order]
            nodes, weights = np.polynomial.legendre.leggauss(max(1, order))
            low, high = sigmas[t], sigmas[t + 1]
            taus = (high - low) / 2 * nodes + (high + low) / 2
            values = np.prod([(taus - s) / (anchor - s) for s in others], axis=0) if others else np.ones_like(taus)
            return float((high - low) / 2 * np.sum(weights * values))

    return LMSWithoutScipy
