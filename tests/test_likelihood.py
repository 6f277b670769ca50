"""The validation estimate of the bound: unbiased, and close to calc_bpd_loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion import GaussianDiffusion, get_named_beta_schedule
from diffusion.process.analytic import GaussianDataDenoiser
from diffusion.process.likelihood import estimate_bpd, harmonic_proposal, stratified_timesteps


def test_proposal_is_a_distribution_proportional_to_one_over_t():
    q = harmonic_proposal(50)
    assert q.shape == (49,)
    np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(q[0] / q[9], 10.0, rtol=1e-12)  # q(1)/q(10)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_stratified_importance_estimate_is_exactly_unbiased(batch):
    """E[mean_i w_i L_{t_i}] = sum_{t>=1} L_t for any L: computed exactly from the overlap of
    each quantile stratum [i/n, (i+1)/n) with each t's interval of q's CDF."""
    T = 40
    L = np.random.default_rng(0).random(T)  # an arbitrary vector of terms
    q = harmonic_proposal(T)
    cdf = np.concatenate([[0.0], np.cumsum(q)])
    expected = 0.0
    for i in range(batch):
        lo, hi = i / batch, (i + 1) / batch
        for k in range(T - 1):  # t = k + 1 occupies [cdf[k], cdf[k+1])
            overlap = max(0.0, min(hi, cdf[k + 1]) - max(lo, cdf[k]))
            expected += overlap * batch * L[k + 1] / q[k] / batch
    np.testing.assert_allclose(expected, L[1:].sum(), rtol=1e-9)
    # ... and the sampler really draws from those strata with those weights.
    t, w = stratified_timesteps(batch, T, torch.Generator().manual_seed(1))
    assert t.min() >= 1 and t.max() <= T - 1
    np.testing.assert_allclose(w.numpy(), 1.0 / q[t.numpy() - 1], rtol=1e-12)
    for i, step in enumerate(t.tolist()):  # image i's t lies in stratum i
        assert cdf[step - 1] <= (i + 1) / batch and cdf[step] >= i / batch


def test_estimate_matches_the_full_bound_on_the_analytic_denoiser():
    process = GaussianDiffusion(betas=get_named_beta_schedule("cosine", 100), model_mean_type="epsilon",
                                model_var_type="learned_range", loss_type="rescaled_mse")
    model = GaussianDataDenoiser(process, 0.2, 0.3)
    g = torch.Generator().manual_seed(0)
    x_start = (torch.randn(256, 1, 2, 2, generator=g, dtype=torch.float64) * 0.3 + 0.2).clamp(-1, 1)
    x_start = torch.round((x_start + 1) * 127.5) / 127.5 - 1  # 8-bit data
    exact = torch.stack([process.calc_bpd_loop(model, x_start, clip_denoised=False,
                                               generator=torch.Generator().manual_seed(s))["total_bpd"].mean()
                         for s in range(4)])
    estimate = torch.stack([estimate_bpd(process, model, x_start, clip_denoised=False,
                                         generator=torch.Generator().manual_seed(100 + s))["total_bpd"].mean()
                            for s in range(30)])
    # Both are Monte-Carlo over the noise: compare their means within 5 standard errors.
    tolerance = 5 * (estimate.var() / len(estimate) + exact.var() / len(exact)).sqrt().item()
    torch.testing.assert_close(estimate.mean(), exact.mean(), atol=tolerance, rtol=0)
    assert tolerance < 0.3  # the test has power: a 4% bias would fail it
    terms = estimate_bpd(process, model, x_start, clip_denoised=False, generator=g)
    torch.testing.assert_close(terms["prior_bpd"], process._prior_bpd(x_start))
    torch.testing.assert_close(terms["total_bpd"], terms["prior_bpd"] + terms["decoder_bpd"] + terms["middle_bpd"])
