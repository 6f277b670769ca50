"""Gaussian diffusion models of images: DDPM, Improved DDPM and DDIM.

The public API of the process layer keeps the improved-diffusion vocabulary; see
DESIGN.md. Names are imported on first use, so ``import diffusion`` stays cheap.
"""

from __future__ import annotations

import importlib

from diffusion import _torchvision_compat  # noqa: F401  (must precede any torchvision import)

_EXPORTS = {
    "get_named_beta_schedule": "diffusion.process.schedules",
    "betas_for_alpha_bar": "diffusion.process.schedules",
    "GaussianDiffusion": "diffusion.process.gaussian_diffusion",
    "ModelMeanType": "diffusion.process.gaussian_diffusion",
    "ModelVarType": "diffusion.process.gaussian_diffusion",
    "LossType": "diffusion.process.gaussian_diffusion",
    "space_timesteps": "diffusion.process.respace",
    "SpacedDiffusion": "diffusion.process.respace",
    "create_named_schedule_sampler": "diffusion.process.resample",
    "UniformSampler": "diffusion.process.resample",
    "LossSecondMomentResampler": "diffusion.process.resample",
    "UNet": "diffusion.nets.unet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffusion' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
