"""Likelihood helpers: Gaussian KL and the discretized decoder (DDPM eq. 13)."""

import math

import pytest
import torch

from diffusion.process.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)

F64 = torch.float64


def test_normal_kl_of_identical_gaussians_is_zero():
    mean = torch.randn(3, 4, dtype=F64)
    logvar = torch.randn(3, 4, dtype=F64)
    torch.testing.assert_close(
        normal_kl(mean, logvar, mean, logvar), torch.zeros(3, 4, dtype=F64), rtol=0, atol=1e-15
    )


def test_normal_kl_agrees_with_torch_distributions_and_broadcasts_scalars():
    m1, lv1 = torch.tensor([0.3, -1.0], dtype=F64), torch.tensor([-0.5, 1.2], dtype=F64)
    ours = normal_kl(m1, lv1, 0.0, 0.0)
    p = torch.distributions.Normal(m1, torch.exp(0.5 * lv1))
    q = torch.distributions.Normal(torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))
    torch.testing.assert_close(
        ours, torch.distributions.kl_divergence(p, q), rtol=1e-12, atol=1e-14
    )


def test_normal_kl_matches_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    m1, v1, m2, v2 = 0.4, 0.5, -0.2, 1.7
    x = m1 + math.sqrt(v1) * torch.randn(400_000, generator=g, dtype=F64)
    p1 = torch.distributions.Normal(m1, math.sqrt(v1))
    p2 = torch.distributions.Normal(m2, math.sqrt(v2))
    log_ratio = p1.log_prob(x) - p2.log_prob(x)  # KL = E_p1[log p1 − log p2]
    kl = normal_kl(torch.tensor(m1, dtype=F64), math.log(v1), m2, math.log(v2))
    stderr = log_ratio.std() / math.sqrt(x.numel())
    assert abs(log_ratio.mean() - kl) < 5 * stderr, (log_ratio.mean(), kl, stderr)


def test_normal_kl_needs_a_tensor():
    with pytest.raises(ValueError, match="tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_approx_cdf_is_close_to_exact_phi():
    x = torch.linspace(-6, 6, 2001, dtype=F64)
    err = (approx_standard_normal_cdf(x) - torch.special.ndtr(x)).abs().max()
    assert err < 2e-4, err


BIN_CENTRES = torch.arange(256, dtype=F64) / 127.5 - 1  # the 8-bit grid on [-1, 1]


@pytest.mark.parametrize(
    "mean,log_scale", [(0.0, -1.0), (0.7, -4.0), (-0.99, -6.0), (2.0, 0.5), (0.1, -9.0)]
)
def test_discretized_likelihood_sums_to_one_over_all_256_bins(mean, log_scale):
    means = torch.full((256,), mean, dtype=F64)
    log_scales = torch.full((256,), log_scale, dtype=F64)
    logp = discretized_gaussian_log_likelihood(BIN_CENTRES, means=means, log_scales=log_scales)
    # telescoping CDF differences; the 1e-12 floors can add at most 256e-12
    torch.testing.assert_close(
        torch.exp(logp).sum(), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-9
    )


def test_discretized_likelihood_matches_exact_bin_masses():
    mean, std = 0.2, 0.05
    logp = discretized_gaussian_log_likelihood(
        BIN_CENTRES,
        means=torch.full((256,), mean, dtype=F64),
        log_scales=torch.full((256,), math.log(std), dtype=F64),
    )
    hi = torch.special.ndtr((BIN_CENTRES + 1 / 255 - mean) / std)
    lo = torch.special.ndtr((BIN_CENTRES - 1 / 255 - mean) / std)
    exact = hi - lo
    exact[0], exact[-1] = hi[0], 1 - lo[-1]
    torch.testing.assert_close(torch.exp(logp), exact, rtol=0, atol=5e-4)  # the tanh CDF's error


def test_discretized_likelihood_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        discretized_gaussian_log_likelihood(
            torch.zeros(2, 3), means=torch.zeros(2, 3), log_scales=torch.zeros(3)
        )


def test_mean_flat_averages_all_but_batch():
    x = torch.arange(24, dtype=F64).view(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), torch.tensor([5.5, 17.5], dtype=F64), rtol=0, atol=0)
