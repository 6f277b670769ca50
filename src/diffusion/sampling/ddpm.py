"""Ancestral sampling, DDPM Algorithm 2 (Ho et al. 2020, arXiv 2006.11239), on all steps or
on a respaced subset (IDDPM sec. 4, arXiv 2102.09672).

On a respaced process each step draws x_{t_prev} ~ p(x_{t_prev} | x_t) with the respaced
β's; with learned variances (``learned_range``) the model's interpolation is applied to the
respaced β and β̃, which is what lets IDDPM models sample well in 50-100 steps (IDDPM
sec. 4, Fig. 8).
"""

from __future__ import annotations

import dataclasses

import torch

from diffusion.sampling import steps as _steps
from diffusion.sampling.base import Sampler


@dataclasses.dataclass
class DDPMSampler(Sampler):
    """Ancestral sampler.

    Args:
        steps: ``None`` visits all T steps; an int N keeps N evenly spaced steps (IDDPM
            sec. 4, improved-diffusion's ``timestep_respacing="N"``).
        respacing: section counts ``"10,15,20"`` (improved-diffusion's
            ``timestep_respacing``), an alternative to ``steps``.
    """

    steps: int | None = None
    respacing: str | None = None

    def __post_init__(self):
        self.respacing = _steps.check_step_choice("DDPMSampler", self.steps, self.respacing)

    def timesteps(self, num_timesteps: int) -> list[int]:
        return _steps.chosen_timesteps(num_timesteps, self.steps, self.respacing,
                                       _steps.evenly_spaced_timesteps)

    def _run_loop(self, process, model, noise, **loop_kwargs) -> torch.Tensor:
        return process.p_sample_loop(model, tuple(noise.shape), noise=noise, **loop_kwargs)
