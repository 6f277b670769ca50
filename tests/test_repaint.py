"""RePaint inpainting (diffusion.sampling.repaint): the jumps schedule, the known region,
the two limits (all known, nothing known), the built-in masks and the mask checks.

The model is the analytic Gaussian denoiser in float64 (as in test_edit.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion import GaussianDiffusion, get_named_beta_schedule
from diffusion.process.analytic import GaussianDataDenoiser
from diffusion.sampling import DDIMSampler, DDPMSampler
from diffusion.sampling.repaint import builtin_mask, model_calls, repaint, resampling_schedule

from test_sampling import chain_moments

MU, STD = 0.2, 0.3


def setup(num_timesteps=100, n=4, seed=0):
    diffusion = GaussianDiffusion(betas=get_named_beta_schedule("linear", num_timesteps), model_mean_type="epsilon",
                                  model_var_type="fixed_small", loss_type="mse")
    g = torch.Generator().manual_seed(seed)
    x = MU + STD * torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64)
    return diffusion, GaussianDataDenoiser(diffusion, MU, STD), x


def noise_of(x, seed=1):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)


def test_the_jumps_schedule_by_hand():
    """N = 5 states, j = 2, r = 2: jumps at the states 0 and 2 (multiples of j below N − j),
    one each: down to 2, up to 4, down to 0, up to 2, down to the data (−1)."""
    assert resampling_schedule(5, jump_length=2, jump_n_sample=2) == [4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    assert resampling_schedule(5, jump_length=1, jump_n_sample=3) == [
        4, 3, 4, 3, 4, 3, 2, 3, 2, 3, 2, 1, 2, 1, 2, 1, 0, 1, 0, 1, 0, -1]  # Alg. 1: U = 3 at every step but the top
    assert resampling_schedule(5, jump_length=2, jump_n_sample=1) == [4, 3, 2, 1, 0, -1]  # r = 1: plain
    assert resampling_schedule(3, jump_length=3, jump_n_sample=5) == [2, 1, 0, -1]  # no room to jump
    # the paper's setting (T = 250, j = 10, r = 10): 24 jump states, 9 jumps of 10 each
    assert model_calls(resampling_schedule(250, 10, 10)) == 250 + 24 * 9 * 10
    with pytest.raises(ValueError, match="jump_length=0 must be an integer >= 1"):
        resampling_schedule(5, jump_length=0)


def test_the_known_region_of_the_output_is_the_input_exactly():
    diffusion, model, x = setup()
    mask = (torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.5).double()
    out = repaint(diffusion, model, x, mask, DDPMSampler(steps=10), jump_length=3, jump_n_sample=3,
                  generator=torch.Generator().manual_seed(4))
    known = mask.expand_as(x).bool()
    assert torch.equal(out[known], x[known])
    assert not torch.equal(out[~known], x[~known])
    assert torch.isfinite(out).all()


def test_an_all_ones_mask_returns_the_input():
    diffusion, model, x = setup()
    out = repaint(diffusion, model, x, torch.ones(6, 6), DDPMSampler(steps=10), jump_length=2, jump_n_sample=2,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x)


@pytest.mark.parametrize("steps", [None, 10])
def test_an_all_zeros_mask_without_resampling_is_ancestral_sampling(steps):
    """Nothing known and r = 1: the same draws as DDPMSampler from the same generator, so the
    same images, on all T steps and on respaced ones."""
    diffusion, model, x = setup(num_timesteps=50)
    sampler = DDPMSampler(steps=steps)
    got = repaint(diffusion, model, x, torch.zeros(6, 6), sampler, jump_length=2, jump_n_sample=1,
                  noise=noise_of(x), generator=torch.Generator().manual_seed(5))
    want = sampler(diffusion, model, noise=noise_of(x), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("jump_n_sample", [1, 4])
def test_the_filled_region_is_distributed_as_ancestral_samples(jump_n_sample):
    """Left half known. The optimal denoiser of i.i.d. N(μ, s²) pixels acts on each pixel
    alone, so the filled pixels never see the known ones: with r = 1 they are ancestral
    samples, of the closed-form mean and variance of test_sampling.chain_moments (10 steps
    of T = 100; 64·2·6·3 = 2304 draws, bounds of 4 standard errors). Resampling (r = 4) runs
    forward and reverse steps that are not each other's exact inverse with fixed_small
    variances; its moments stay within 10 % of those."""
    diffusion, model, x = setup(n=64)
    sampler = DDPMSampler(steps=10)
    out = repaint(diffusion, model, x, builtin_mask("half", 6, 6), sampler, jump_length=2,
                  jump_n_sample=jump_n_sample, generator=torch.Generator().manual_seed(6))
    assert torch.equal(out[..., :3], x[..., :3])
    filled = out[..., 3:]
    mean, var = chain_moments(diffusion.alphas_cumprod, sampler.timesteps(100), "ddpm")
    n = filled.numel()
    if jump_n_sample == 1:
        assert abs(float(filled.mean()) - mean) < 4 * math.sqrt(var / n)
        assert abs(float(filled.var()) - var) < 4 * var * math.sqrt(2 / n)
    else:
        assert float(filled.mean()) == pytest.approx(mean, rel=0.1)
        assert float(filled.var()) == pytest.approx(var, rel=0.1)


def test_builtin_masks():
    half = builtin_mask("half", 4, 6)
    assert half.shape == (1, 1, 4, 6) and half[..., :3].eq(1).all() and half[..., 3:].eq(0).all()
    center = builtin_mask("center", 8, 8, count=2)
    assert center.shape == (2, 1, 8, 8) and center.sum() == 2 * (64 - 16)
    assert center[..., 2:6, 2:6].eq(0).all()
    strokes = builtin_mask("strokes", 16, 16, count=3, generator=torch.Generator().manual_seed(0))
    again = builtin_mask("strokes", 16, 16, count=3, generator=torch.Generator().manual_seed(0))
    other = builtin_mask("strokes", 16, 16, count=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(strokes, again) and not torch.equal(strokes, other)
    assert set(strokes.unique().tolist()) == {0.0, 1.0} and 0.05 < float(1 - strokes.mean()) < 0.9
    with pytest.raises(ValueError, match="mask='ring' is not one of half, center, strokes"):
        builtin_mask("ring", 4, 4)


def test_bad_masks_and_samplers_are_refused():
    diffusion, model, x = setup()
    with pytest.raises(ValueError, match=r"mask of shape \(5, 5\) does not broadcast"):
        repaint(diffusion, model, x, torch.ones(5, 5), DDPMSampler(steps=10))
    with pytest.raises(ValueError, match="other than 0 and 1"):
        repaint(diffusion, model, x, torch.full((6, 6), 0.5), DDPMSampler(steps=10))
    with pytest.raises(ValueError, match="pass a DDPM sampler"):
        repaint(diffusion, model, x, torch.ones(6, 6), DDIMSampler(steps=10))
