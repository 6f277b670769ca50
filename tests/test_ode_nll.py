"""The probability-flow ODE likelihood (diffusion.evaluation.ode_nll) against closed forms.

For data x_0 ~ N(μ, s² I) every marginal of x̃ = x_0 + σ n is N(μ, (s² + σ²) I) and the
analytic denoiser is exact at every σ, so the ODE's path and its log-density change are known:

    x̃(σ) − μ = (x̃_0 − μ) √((s² + σ²)/(s² + σ_0²)),   ∫ div g ds = dim/2 · log((s² + σ²)/(s² + σ_0²)),

and log p_σ0(x̃_0) = log N(x̃_0; μ, (s² + σ_0²) I). The only inexact piece of the method is its
prior N(0, (1 + σ_max²) I) in place of N(μ, (s² + σ_max²) I) (the process's L_T), whose gap is
computed here independently.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from diffusion import GaussianDiffusion, get_named_beta_schedule
from diffusion.evaluation.ode_nll import (
    DEQUANTIZATION_BITS,
    bits_per_dim,
    dequantize,
    ode_log_likelihood,
)
from diffusion.evaluation.ode_solver import dopri5
from diffusion.jobs.evaluate import evaluate
from diffusion.process.analytic import (
    GaussianDataDenoiser,
    discretized_gaussian_entropy_bits,
    discretized_gaussian_nll_bits,
    sample_discretized_gaussian,
)
from diffusion.sampling.sigmas import Denoiser
from diffusion.utils.errors import ConfigError

F64 = torch.float64
MU, S = 0.2, 0.3
T = 1000
ALPHAS_CUMPROD = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))  # Ho et al.'s linear schedule, independently
SIGMA_MIN, SIGMA_MAX = np.sqrt((1.0 - ALPHAS_CUMPROD[[0, -1]]) / ALPHAS_CUMPROD[[0, -1]])


def make_denoiser(mean_type="epsilon", var_type="fixed_small", mean=MU, std=S):
    d = GaussianDiffusion(betas=get_named_beta_schedule("linear", T), model_mean_type=mean_type,
                          model_var_type=var_type, loss_type="mse")
    return Denoiser(d, GaussianDataDenoiser(d, mean, std), clip_denoised=False)


def gaussian_log_prob(x, mean, var):
    """log N(x; mean, var I) per image, (B,)."""
    dim = x[0].numel()
    return -0.5 * dim * math.log(2 * math.pi * var) - (x - mean).flatten(1).pow(2).sum(1) / (2 * var)


def points(num=64, seed=0):
    return MU + S * torch.randn(num, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_dopri5_is_accurate_in_both_directions():
    y0 = torch.tensor([[1.0, -2.0]], dtype=F64)
    y, nfe = dopri5(lambda t, y: -t * y, y0, 0.0, 3.0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y, y0 * math.exp(-4.5), rtol=1e-7, atol=1e-10)
    back, _ = dopri5(lambda t, y: -y, y0, 2.0, 0.0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(back, y0 * math.exp(2.0), rtol=1e-6, atol=0)
    loose, loose_nfe = dopri5(lambda t, y: -t * y, y0, 0.0, 3.0, rtol=1e-3, atol=1e-3)
    assert loose_nfe < nfe  # the step size follows the tolerance


@pytest.mark.parametrize("mean_type, var_type", [("epsilon", "fixed_small"), ("v", "learned_range"),
                                                 ("start_x", "learned")])
def test_exact_divergence_gives_the_gaussian_log_density(mean_type, var_type):
    """Every parameterisation (the mean part of learned-variance models) to ~1e-4."""
    x = points()
    out = ode_log_likelihood(make_denoiser(mean_type, var_type), x, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                             divergence="exact", rtol=1e-7, atol=1e-7)
    ratio = (S**2 + SIGMA_MAX**2) / (S**2 + SIGMA_MIN**2)
    torch.testing.assert_close(out["x_end"], MU + (x - MU) * math.sqrt(ratio), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["delta_log_prob"], torch.full((64,), 2 * math.log(ratio), dtype=F64),
                               rtol=1e-5, atol=0)
    exact = gaussian_log_prob(x, MU, S**2 + SIGMA_MIN**2)
    # With the true marginal at σ_max as its prior the method is exact ...
    true_prior = gaussian_log_prob(out["x_end"], MU, S**2 + SIGMA_MAX**2)
    torch.testing.assert_close(true_prior + out["delta_log_prob"], exact, rtol=1e-4, atol=1e-4)
    # ... and with the process's N(0, (1 + σ_max²) I) it is off by that prior's gap alone.
    gap = gaussian_log_prob(out["x_end"], 0.0, 1 + SIGMA_MAX**2) - true_prior
    torch.testing.assert_close(out["log_prob"], exact + gap, rtol=1e-4, atol=1e-4)
    assert gap.abs().max() < 0.01


def test_the_checks_would_catch_a_wrong_direction_or_a_missing_prior():
    """The differences such bugs make are far above the tolerances of the test above."""
    x = points(16)
    out = ode_log_likelihood(make_denoiser(), x, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, divergence="exact")
    exact = gaussian_log_prob(x, MU, S**2 + SIGMA_MIN**2)
    reversed_direction = out["prior_log_prob"] - out["delta_log_prob"]  # ∫ taken from σ_max down
    missing_prior = out["delta_log_prob"]
    for wrong in (reversed_direction, missing_prior):
        assert (wrong - exact).abs().min() > 10
    assert (out["log_prob"] - exact).abs().max() < 0.01


def test_hutchinson_is_within_three_standard_errors():
    """Gaussian probes (for this denoiser, whose Jacobian is a multiple of I, Rademacher
    probes are exact): the mean error over points is within 3 standard errors of 0."""
    x = points(256, seed=1)
    g = torch.Generator().manual_seed(2)
    out = ode_log_likelihood(make_denoiser(), x, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, divergence="hutchinson",
                             probes=2, probe_distribution="gaussian", generator=g)
    true_prior = gaussian_log_prob(out["x_end"], MU, S**2 + SIGMA_MAX**2)
    error = true_prior + out["delta_log_prob"] - gaussian_log_prob(x, MU, S**2 + SIGMA_MIN**2)
    sem = error.std() / math.sqrt(len(error))
    assert error.std() > 0.1  # the probes do add noise
    assert error.mean().abs() < 3 * sem


def test_dequantized_bits_per_dim_bound_the_discrete_nll():
    """Eq. (4) against the closed-form NLL of 8-bit Gaussian data: E[bound − exact] is the
    Jensen gap (~0 for bins much narrower than s), so the mean difference is within 3 standard
    errors of 0, and a Jacobian of log₂ 128 per dim (5.6e-3 bits off) is rejected."""
    g = torch.Generator().manual_seed(3)
    x = sample_discretized_gaussian((1024, 1, 2, 2), 0.0, 0.2, generator=g)  # edges 5 std away
    out = ode_log_likelihood(make_denoiser(mean=0.0, std=0.2), dequantize(x, g), sigma_min=SIGMA_MIN,
                             sigma_max=SIGMA_MAX, divergence="exact")
    diff = bits_per_dim(out["log_prob"], 4) - discretized_gaussian_nll_bits(x, 0.0, 0.2).flatten(1).mean(1)
    sem = float(diff.std() / math.sqrt(len(diff)))
    assert abs(float(diff.mean())) < 3 * sem
    wrong_jacobian = float(diff.mean()) + math.log2(128) - DEQUANTIZATION_BITS
    assert abs(wrong_jacobian) > 3 * sem
    # ≈ the entropy of the 8-bit data, h(N(0, 0.04)) − log₂(2/255) = 6.72 bits
    assert float(bits_per_dim(out["log_prob"], 4).mean()) == pytest.approx(discretized_gaussian_entropy_bits(0, 0.2),
                                                                          abs=0.05)


def test_dequantize_stays_in_the_bins():
    x = torch.arange(256, dtype=F64) / 127.5 - 1
    y = dequantize(x, torch.Generator().manual_seed(0))
    assert ((y - x).abs() <= 1 / 255).all() and not torch.equal(y, x)


def test_evaluate_ode_nll_writes_json(compose_cfg, tiny_ckpt, tmp_path):
    cfg = compose_cfg("evaluate", [f"ckpt={tiny_ckpt}", "metric=ode_nll", "max_batches=1", "batch_size=4",
                                   "ode_rtol=1e-3", "ode_atol=1e-3", "progress=false"], output_dir=tmp_path / "eval")
    results = evaluate(cfg)
    saved = json.load(open(tmp_path / "eval" / "ode_nll.json"))
    assert saved["bpd"] == pytest.approx(results["bpd"]) and saved["num_images"] == 4
    assert math.isfinite(saved["bpd"]) and saved["bpd_sem"] > 0 and saved["nfe"] >= 8 and saved["seconds"] > 0
    assert saved["metric"] == "ode_nll" and saved["divergence"] == "hutchinson"
    assert not [n for n in os.listdir(tmp_path / "eval") if n.endswith(".tmp")]


@pytest.mark.parametrize("override, key", [("ode_divergence=trace", "ode_divergence"), ("ode_probes=0", "ode_probes"),
                                           ("ode_rtol=0", "ode_rtol"), ("ode_atol=2", "ode_atol"),
                                           ("ode_probe_distribution=uniform", "ode_probe_distribution")])
def test_bad_ode_settings_are_one_line_errors(compose_cfg, tmp_path, override, key):
    cfg = compose_cfg("evaluate", ["ckpt=missing.ckpt", "metric=ode_nll", override], output_dir=tmp_path / "eval")
    with pytest.raises(ConfigError, match=key) as info:
        evaluate(cfg)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "eval").exists()
