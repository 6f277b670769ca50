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
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffusion.process._tensor import extract_into_tensor
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

    def _indices(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():  # rescaled timesteps t·1000/T back to indices
            return torch.round(t.double() * (self.diffusion.num_timesteps / 1000.0)).long()
        return t.long()

    def _a_b(self, x_t, t):
        d = self.diffusion
        return extract_into_tensor(d.sqrt_alphas_cumprod, t, x_t), extract_into_tensor(
            d.sqrt_one_minus_alphas_cumprod, t, x_t
        )

    def posterior_mean_x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t] = μ + a s²/(a² s² + b²)·(x_t − a μ)."""
        a, b = self._a_b(x_t, self._indices(t))
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
        return self._var_x0(x_t, self._indices(t)).expand_as(x_t)

    def reverse_variance(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Var[x_{t-1} | x_t] = β̃_t + coef1_t² Var[x_0 | x_t], the optimal Σ_θ, of x_t's shape."""
        return self._reverse_var(x_t, self._indices(t)).expand_as(x_t)

    def _mean_output(self, x_t, t):
        d = self.diffusion
        idx = self._indices(t)
        x0 = self.posterior_mean_x0(x_t, t)
        a, b = self._a_b(x_t, idx)
        eps = (x_t - a * x0) / b
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
        if self.diffusion.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            out = torch.cat(
                [out, self._variance_output(x_t, t)], dim=1
            )  # 2 x (B, C, ...) -> (B, 2C, ...)
        return out

    def data_nll_bits_per_dim(self, x_start: torch.Tensor) -> torch.Tensor:
        """Exact −log₂ P(x_start) per dimension under the 8-bit discretised data, (B,)."""
        return discretized_gaussian_nll_bits(x_start, self.mean, self.std).flatten(1).mean(dim=1)

    def data_entropy_bits_per_dim(self) -> float:
        """E[−log₂ P(x_0)] per dimension: the best achievable bits/dim on this data."""
        return discretized_gaussian_entropy_bits(self.mean, self.std)


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
