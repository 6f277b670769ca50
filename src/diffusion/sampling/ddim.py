"""DDIM sampling (Song et al. 2020, arXiv 2010.02502) on a subsequence τ of the T steps.

Each step is DDIM eq. 12 with σ from eq. 16, computed by the process's ``ddim_sample``:

    x_{τ_{i-1}} = √ᾱ_{τ_{i-1}} x̂_0 + √(1 − ᾱ_{τ_{i-1}} − σ²) ε̂ + σ z,
    σ = η √((1 − ᾱ_{τ_{i-1}}) / (1 − ᾱ_{τ_i})) √(1 − ᾱ_{τ_i} / ᾱ_{τ_{i-1}}),

η = 0 is the deterministic DDIM, η = 1 ancestral sampling with the posterior variance.
τ comes from the DDIM paper's App. D.2 selection rules (``skip``) or from improved-
diffusion's section counts (``respacing``); see ``diffusion.sampling.steps``.
"""

from __future__ import annotations

import dataclasses

import torch

from diffusion.sampling import steps as _steps
from diffusion.sampling.base import Sampler

_SKIP_RULES = {
    "uniform": _steps.uniform_skip_timesteps,
    "quadratic": _steps.quadratic_skip_timesteps,
    "trailing": _steps.trailing_timesteps,
    "linspace": _steps.evenly_spaced_timesteps,
}


@dataclasses.dataclass
class DDIMSampler(Sampler):
    """DDIM sampler.

    Args:
        steps: number of steps N; ``None`` visits all T steps. Must be ``None`` when
            ``respacing`` is given (they are alternatives; nothing is silently ignored).
        eta: η of DDIM eq. 16, in [0, 1] as in the paper (0 = deterministic).
        skip: how N steps are chosen among T: ``"uniform"`` (``range(0, T, k)`` with exactly
            N entries; DDIM's ``T // N`` stride whenever N divides T, improved-diffusion's
            ``"ddimN"``; the field's "leading" grid), ``"quadratic"`` (DDIM's τ_i = floor(c i²),
            last step 0.8 T), ``"trailing"`` (Lin et al. 2023: from T − 1 down by T/N, the
            last call at T/N − 1) or ``"linspace"`` (N evenly spaced from T − 1 to 0, rounded:
            improved-diffusion's ``respacing="N"``).
        respacing: section counts ``"10,15,20"`` instead of ``steps`` and ``skip``.
    """

    steps: int | None = 50
    eta: float = 0.0
    skip: str = "uniform"
    respacing: str | None = None

    def __post_init__(self):
        self.respacing = _steps.check_step_choice("DDIMSampler", self.steps, self.respacing)
        self.eta = float(self.eta)
        if self.skip not in _SKIP_RULES:
            raise ValueError(f"unknown skip {self.skip!r}; valid: {', '.join(_SKIP_RULES)}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (DDIM eq. 16), got {self.eta}")
        if self.steps is None and self.skip != "uniform":
            # the skip rule picks `steps` of T: without a count there is nothing to pick
            raise ValueError(
                f"DDIMSampler got skip={self.skip!r} without steps (respacing="
                f"{self.respacing!r}); give steps, or leave skip at 'uniform'"
            )

    def timesteps(self, num_timesteps: int) -> list[int]:
        return _steps.chosen_timesteps(num_timesteps, self.steps, self.respacing, _SKIP_RULES[self.skip])

    def _run_loop(self, process, model, noise, **loop_kwargs) -> torch.Tensor:
        return process.ddim_sample_loop(
            model, tuple(noise.shape), noise=noise, eta=self.eta, **loop_kwargs
        )
