"""Gaussian diffusion models of images: DDPM, Improved DDPM and DDIM.

The public API of the process layer keeps the improved-diffusion vocabulary; see
the README's "Architecture" section. Names are imported on first use, so ``import diffusion`` stays cheap.
"""

from __future__ import annotations

from diffusion import _torchvision_compat  # noqa: F401  (must precede any torchvision import)
from diffusion.utils.lazy import lazy_exports

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
    # The Bayes-optimal model of Gaussian data: a reference model for studying samplers.
    "GaussianDataDenoiser": "diffusion.process.analytic",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("diffusion", _EXPORTS, globals())
