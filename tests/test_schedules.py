"""Beta schedules against their closed forms (Ho et al. 2020; IDDPM eq. 17)."""

import math

import numpy as np
import pytest
import torch

from diffusion.process.schedules import betas_for_alpha_bar, get_named_beta_schedule


def _assert_close(actual, expected, **tol):
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), **tol)


def test_linear_t1000_runs_from_1e4_to_0p02():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    _assert_close(betas[[0, -1]], np.array([1e-4, 0.02]), rtol=0, atol=1e-15)
    _assert_close(np.diff(betas), np.full(999, (0.02 - 1e-4) / 999), rtol=1e-9, atol=0)


def test_linear_t4000_ends_are_divided_by_4():
    betas = get_named_beta_schedule("linear", 4000)
    _assert_close(betas[[0, -1]], np.array([1e-4, 0.02]) / 4, rtol=0, atol=1e-15)


def _f(t, s=0.008):
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_cosine_alpha_bar_matches_f_ratio_where_unclipped(T):
    betas = get_named_beta_schedule("cosine", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert (betas <= 0.999).all() and (betas > 0).all()
    clipped = betas >= 0.999
    assert clipped[-1], "f(1) = cos²(π/2) ≈ 0, so the last beta must hit the 0.999 clip"
    first_clip = int(np.argmax(clipped))
    alpha_bar = np.cumprod(1 - betas)
    expected = np.array([_f((i + 1) / T) / _f(0) for i in range(first_clip)])
    _assert_close(alpha_bar[:first_clip], expected, rtol=1e-10, atol=1e-14)


def test_betas_for_alpha_bar_clips_at_max_beta():
    betas = betas_for_alpha_bar(10, lambda t: 1 - t, max_beta=0.5)
    # 1 − ᾱ((i+1)/10)/ᾱ(i/10) = 1/(10 − i): 0.1, 0.111, ..., 0.5, 1 -> clipped to 0.5
    expected = np.minimum([1 / (10 - i) for i in range(10)], 0.5)
    _assert_close(betas, expected, rtol=1e-12, atol=0)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match=r"'quadratic'.*\['cosine', 'linear'\]"):
        get_named_beta_schedule("quadratic", 1000)


@pytest.mark.parametrize("T", [0, -3, 2.5, True])
def test_bad_step_count_is_rejected(T):
    with pytest.raises(ValueError, match="num_diffusion_timesteps"):
        get_named_beta_schedule("linear", T)


def test_keyword_names_match_the_hydra_config():
    # configs/diffusion/schedule/*.yaml call it with these keywords
    betas = get_named_beta_schedule(schedule_name="cosine", num_diffusion_timesteps=7)
    assert betas.shape == (7,)
