"""Samplers: objects with one call signature that turn a trained model into images.

    sampler = get_sampler("ddim50")                     # or a configs/sampler/*.yaml
    x0 = sampler(diffusion, model, shape=(16, 3, 32, 32), generator=g)

``diffusion`` is the base process from the checkpoint; the sampler respaces it itself.
The presets below are also ``configs/sampler/NAME.yaml`` (``sample.py sampler=NAME``).
The σ-space solvers (``diffusion.sampling.solvers``: DPM-Solver++(2M) and (3M), UniPC,
EDM's Heun, Euler ancestral) call the model at fractional timesteps of the base process instead.
"""

from __future__ import annotations

import functools

from diffusion.sampling.base import Sampler
from diffusion.sampling.ddim import DDIMSampler
from diffusion.sampling.ddpm import DDPMSampler
from diffusion.sampling.solvers import (
    ConsistencySampler,
    DPMSolverPP2MSampler,
    DPMSolverPP3MSampler,
    EulerAncestralSampler,
    HeunSampler,
    UniPCSampler,
)

SAMPLERS = {
    "ddpm": functools.partial(DDPMSampler),
    "ddpm250": functools.partial(DDPMSampler, steps=250),
    "ddpm100": functools.partial(DDPMSampler, steps=100),
    "ddim10": functools.partial(DDIMSampler, steps=10),
    "ddim20": functools.partial(DDIMSampler, steps=20),
    "ddim50": functools.partial(DDIMSampler, steps=50),
    "ddim100": functools.partial(DDIMSampler, steps=100),
    "ddim250": functools.partial(DDIMSampler, steps=250),
    "ddim50_eta1": functools.partial(DDIMSampler, steps=50, eta=1.0),
    "dpmpp2m10": functools.partial(DPMSolverPP2MSampler, steps=10),
    "dpmpp2m20": functools.partial(DPMSolverPP2MSampler, steps=20),
    "dpmpp3m10": functools.partial(DPMSolverPP3MSampler, steps=10),
    "unipc10": functools.partial(UniPCSampler, steps=10),
    # 5 calls: a lower start (σ_max = 10) measured best (README, "Few-step sampling")
    "unipc5": functools.partial(UniPCSampler, steps=5, sigma_max=10.0),
    "heun18": functools.partial(HeunSampler, steps=18),
    "euler_a50": functools.partial(EulerAncestralSampler, steps=50),
}


def get_sampler(name: str, **overrides) -> Sampler:
    """The preset ``name`` (a key of ``SAMPLERS``), with keyword ``overrides`` of its
    constructor arguments, e.g. ``get_sampler("ddim50", eta=0.5)``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](**overrides)


__all__ = [
    "SAMPLERS",
    "ConsistencySampler",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSampler",
    "DPMSolverPP3MSampler",
    "EulerAncestralSampler",
    "HeunSampler",
    "Sampler",
    "UniPCSampler",
    "get_sampler",
]
