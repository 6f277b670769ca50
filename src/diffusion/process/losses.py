"""Likelihood helpers: Gaussian KL and the discretized Gaussian decoder of Ho et al.

All return values in nats, elementwise; callers average over pixels and divide by log 2
to report bits per dimension.
"""

from __future__ import annotations

import math

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL( N(mean1, e^logvar1) || N(mean2, e^logvar2) ), elementwise, in nats.

    KL = ½ (log σ₂² − log σ₁² + σ₁²/σ₂² + (μ₁ − μ₂)²/σ₂² − 1). Arguments broadcast;
    scalars are allowed as long as at least one argument is a tensor.
    """
    ref = next((v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, torch.Tensor)), None)
    if ref is None:
        raise ValueError("normal_kl needs at least one tensor argument, got only scalars")
    # torch.exp needs tensors; scalars become tensors of the reference dtype and device.
    logvar1, logvar2 = (
        v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=ref.dtype, device=ref.device)
        for v in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) ≈ ½ (1 + tanh(√(2/π) (x + 0.044715 x³))), the approximation of Ho et al.

    Kept (rather than the exact ``torch.special.ndtr``) so that likelihoods agree with
    models evaluated by improved-diffusion to the last digit.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log P(x) for 8-bit data under N(means, e^(2 log_scales)) integrated over x's bin.

    DDPM eq. 13 (Ho et al., arXiv 2006.11239): ``x`` holds uint8 values rescaled to
    [-1, 1], so bins have half-width 1/255; the two edge bins extend to ∓∞.

    :param x: target images in [-1, 1] on the 8-bit grid, shape (B, ...).
    :param means: Gaussian means, same shape.
    :param log_scales: log standard deviations, same shape.
    :return: elementwise log-probabilities in nats, same shape.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
            f"log_scales {tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    # Clamps keep log() finite when a bin carries (numerically) no mass.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # 0.999 rather than 1: the edge values are exactly ±1, this tests them robustly.
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )
