"""The Bayes-optimal denoiser for Gaussian data, and the exact NLL of such data on 8 bits.

For x_0 ~ N(μ, s² I) and x_t = a x_0 + b ε (a = √ᾱ_t, b = √(1−ᾱ_t)), x_0 and x_t are
jointly Gaussian, so every optimal prediction is affine in x_t:

    E[x_0 | x_t]   = μ + a s²/(a² s² + b²) · (x_t − a μ)
    Var[x_0 | x_t] = s² b²/(a² s² + b²)
    E[ε | x_t]     = (x_t − a E[x_0 | x_t]) / b

and the true reverse step q(x_{t-1} | x_t) is itself Gaussian, with mean
E[μ̃(x_0, x_t) | x_t] and variance β̃_t + coef1² Var[x_0 | x_t] (law of total variance;
coef1 = posterior_mean_coef1). A model that outputs these is the minimiser of every loss
of the process, which makes it a test oracle with closed-form answers.

Fractional timesteps (the continuous-σ samplers of diffusion.sampling.sigmas call the model
between the grid points): ᾱ at a fractional index t is 1/(1 + σ(t)²), where log σ is
interpolated linearly in t between the neighbouring steps' σ_i = √((1−ᾱ_i)/ᾱ_i)
(k-diffusion's DiscreteSchedule convention, the samplers' own). The variance channels of
learned-variance models are only defined on the grid and are given at the nearest step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from diffusion.process._tensor import extract_into_tensor, unscale_timesteps
from diffusion.process.gaussian_diffusion import GaussianDiffusion, ModelMeanType, ModelVarType


class GaussianDataDenoiser(nn.Module):
    """The optimal model for data x_0 ~ N(mean, std² I) under ``diffusion``'s settings.

    Called as the process calls a model, ``model(x_t, t)``, with t the ORIGINAL 0-based
    indices (int64) or t·1000/T floats when ``diffusion.rescale_timesteps``. Build it with
    the full T-step process; respaced processes call it with original indices. For learned
    variances the optimal variance of the full process is encoded as that process decodes
    it (log-variance, or the IDDPM eq. 15 value clamped to [-1, 1]).
    """

    def __init__(self, diffusion: GaussianDiffusion, mean: float, std: float):
        super().__init__()
        if not std > 0:
            raise ValueError(f"std must be positive, got {std!r}")
        self.diffusion = diffusion
        self.mean = float(mean)
        self.std = float(std)

    def _fractional_index(self, t: torch.Tensor) -> torch.Tensor:
        """Float t as a float64 index into the T steps (t·1000/T undone when rescaled)."""
        d = self.diffusion
        return unscale_timesteps(t, d.num_timesteps, d.rescale_timesteps)

    def _indices(self, t: torch.Tensor) -> torch.Tensor:
        """The nearest grid index of each timestep (int64)."""
        if t.is_floating_point():
            return torch.round(self._fractional_index(t)).long()
        return t.long()

    def _on_grid(self, t: torch.Tensor) -> torch.Tensor:
        """True where t is a grid step: an integer, or a float within rounding of one (the
        process's own rescaled t·1000/T in float32 is off by up to ~1e-7 relative)."""
        if not t.is_floating_point():
            return torch.ones_like(t, dtype=torch.bool)
        index = self._fractional_index(t)
        tol = 8 * torch.finfo(t.dtype).eps * index.abs().clamp(min=1.0)
        return (index - torch.round(index)).abs() <= tol

    def _a_b(self, x_t, t):
        d = self.diffusion
        return extract_into_tensor(d.sqrt_alphas_cumprod, t, x_t), extract_into_tensor(
            d.sqrt_one_minus_alphas_cumprod, t, x_t
        )

    def _interpolated_a_b(self, x_t, t):
        """a = √ᾱ(t), b = √(1−ᾱ(t)) at fractional t: log σ linear in t between the steps,
        ᾱ = 1/(1 + σ²); a = 1/√(1 + σ²), b = 1/√(1 + σ⁻²) (no 1 − ᾱ cancellation, and finite
        at σ = ∞, zero terminal SNR). Float64 on the host, then cast to x_t's dtype and
        device; shapes (B, 1, ..., 1)."""
        d = self.diffusion
        index = self._fractional_index(t).cpu()
        last = d.num_timesteps - 1
        if bool(((index < 0) | (index > last)).any()):
            raise ValueError(
                f"fractional timesteps must lie in [0, {last}] (as indices), got "
                f"{index.min().item()}..{index.max().item()}"
            )
        log_sigmas = torch.from_numpy(np.log(d.sqrt_recipm1_alphas_cumprod))  # (T,)
        lo = index.floor().long().clamp(max=max(last - 1, 0))
        hi = (lo + 1).clamp(max=last)
        log_sigma = log_sigmas[lo] + (index - lo) * (log_sigmas[hi] - log_sigmas[lo])
        sigma = torch.exp(log_sigma)
        a, b = torch.rsqrt(1.0 + sigma**2), torch.rsqrt(1.0 + sigma**-2)
        shape = (-1, *([1] * (x_t.ndim - 1)))  # (B,) -> (B, 1, ..., 1)
        return tuple(v.to(x_t.dtype).to(x_t.device).view(shape) for v in (a, b))

    def _alphas(self, x_t, t):
        """(a, b) = (√ᾱ, √(1−ᾱ)): the schedule's own values on the grid (bit-identical to
        integer t), the log-σ interpolation between grid steps."""
        a, b = self._a_b(x_t, self._indices(t))
        on_grid = self._on_grid(t)
        if bool(on_grid.all()):
            return a, b
        a_frac, b_frac = self._interpolated_a_b(x_t, t)
        keep = on_grid.to(x_t.device).view(a.shape)  # (B,) -> (B, 1, ..., 1)
        return torch.where(keep, a, a_frac), torch.where(keep, b, b_frac)

    def posterior_mean_x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t] = μ + a s²/(a² s² + b²)·(x_t − a μ)."""
        a, b = self._alphas(x_t, t)
        s2 = self.std**2
        return self.mean + a * s2 / (a**2 * s2 + b**2) * (x_t - a * self.mean)

    def _var_x0(self, x_t, idx):
        a, b = self._a_b(x_t, idx)  # (B, 1, ..., 1) each: the variance does not depend on x_t
        s2 = self.std**2
        return s2 * b**2 / (a**2 * s2 + b**2)

    def _reverse_var(self, x_t, idx):
        d = self.diffusion
        coef1 = extract_into_tensor(d.posterior_mean_coef1, idx, x_t)
        post_var = extract_into_tensor(d.posterior_variance, idx, x_t)
        return post_var + coef1**2 * self._var_x0(x_t, idx)

    def posterior_var_x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Var[x_0 | x_t] = s² b²/(a² s² + b²), of x_t's shape."""
        a, b = self._alphas(x_t, t)
        s2 = self.std**2
        return (s2 * b**2 / (a**2 * s2 + b**2)).expand_as(x_t)

    def reverse_variance(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Var[x_{t-1} | x_t] = β̃_t + coef1_t² Var[x_0 | x_t], the optimal Σ_θ, of x_t's shape."""
        return self._reverse_var(x_t, self._indices(t)).expand_as(x_t)

    def _mean_output(self, x_t, t):
        d = self.diffusion
        idx = self._indices(t)
        x0 = self.posterior_mean_x0(x_t, t)
        a, b = self._alphas(x_t, t)
        eps = (x_t - a * x0) / b
        if d.model_mean_type == ModelMeanType.PREVIOUS_X and not bool(self._on_grid(t).all()):
            raise ValueError(
                "model_mean_type='previous_x' is only defined on the grid steps (x_{t-1} "
                "needs the step's posterior coefficients); got fractional timesteps"
            )
        return {
            ModelMeanType.START_X: lambda: x0,
            ModelMeanType.EPSILON: lambda: eps,
            ModelMeanType.V: lambda: a * eps - b * x0,  # E[v|x_t], v linear in (ε, x_0)
            ModelMeanType.PREVIOUS_X: lambda: d.q_posterior_mean_variance(x0, x_t, idx)[0],
        }[d.model_mean_type]()

    def _variance_output(self, x_t, t):
        d = self.diffusion
        idx = self._indices(t)
        log_var = torch.log(self._reverse_var(x_t, idx))  # (B, 1, ..., 1)
        if d.model_var_type == ModelVarType.LEARNED:
            return log_var.expand_as(x_t)
        # invert IDDPM eq. 15: log Σ = frac·log β_t + (1 − frac)·log β̃_t, v = 2·frac − 1
        min_log = extract_into_tensor(d.posterior_log_variance_clipped, idx, x_t)
        max_log = extract_into_tensor(d.log_betas, idx, x_t)
        frac = (log_var - min_log) / (max_log - min_log)
        return (2 * frac - 1).clamp(-1, 1).expand_as(x_t)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        out = self._mean_output(x_t, t)
        if self.diffusion.model_var_type.is_learned():
            out = torch.cat(
                [out, self._variance_output(x_t, t)], dim=1
            )  # 2 x (B, C, ...) -> (B, 2C, ...)
        return out

    def data_nll_bits_per_dim(self, x_start: torch.Tensor) -> torch.Tensor:
        """Exact −log₂ P(x_start) per dimension under the 8-bit discretised data, (B,)."""
        return discretized_gaussian_nll_bits(x_start, self.mean, self.std).flatten(1).mean(dim=1)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round values to the 256 bin centres 2k/255 − 1 of 8-bit data in [-1, 1]."""
    k = torch.round((x + 1) * 127.5).clamp(0, 255)
    return k / 127.5 - 1


def sample_discretized_gaussian(
    shape, mean: float, std: float, generator=None, dtype=torch.float64
):
    """Draw x_0 ~ N(mean, std²) elementwise and quantise it to 8 bits, as a dataset would."""
    return quantize_8bit(mean + std * torch.randn(tuple(shape), generator=generator, dtype=dtype))


def discretized_gaussian_nll_bits(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Elementwise exact −log₂ P(x) for 8-bit x under N(mean, std²), with the bins of the
    discretized decoder (half-width 1/255; the edge bins reach ∓∞). Uses the exact Φ."""
    x = x.double()
    z_lo = (x - 1.0 / 255.0 - mean) / std
    z_hi = (x + 1.0 / 255.0 - mean) / std
    inner = torch.special.ndtr(z_hi) - torch.special.ndtr(z_lo)
    # edge bins: P(X < x + 1/255) and P(X > x − 1/255), the latter as Φ(−z) (no cancellation)
    prob = torch.where(
        x < -0.999,
        torch.special.ndtr(z_hi),
        torch.where(x > 0.999, torch.special.ndtr(-z_lo), inner),
    ).clamp(min=1e-300)
    return -torch.log(prob) / math.log(2.0)


def discretized_gaussian_entropy_bits(mean: float, std: float) -> float:
    """Σ_k −P_k log₂ P_k over the 256 bins: the exact NLL per dimension in expectation."""
    centres = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    nll = discretized_gaussian_nll_bits(centres, mean, std)
    prob = torch.exp2(-nll)
    return float((prob * nll).sum())


__all__ = [
    "GaussianDataDenoiser",
    "discretized_gaussian_entropy_bits",
    "discretized_gaussian_nll_bits",
    "quantize_8bit",
    "sample_discretized_gaussian",
]
