"""The process layer: pure torch + numpy math of Gaussian diffusion (no Lightning, no Hydra)."""

from diffusion.process.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
)
from diffusion.process.resample import (
    LossAwareSampler,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from diffusion.process.respace import SpacedDiffusion, respace, space_timesteps
from diffusion.process.schedules import betas_for_alpha_bar, get_named_beta_schedule

__all__ = [
    "GaussianDiffusion",
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "ScheduleSampler",
    "SpacedDiffusion",
    "UniformSampler",
    "betas_for_alpha_bar",
    "create_named_schedule_sampler",
    "get_named_beta_schedule",
    "respace",
    "space_timesteps",
]
