"""Timestep samplers (IDDPM sec. 3.3): unbiased weights, warm-up, history, checkpoints."""

import io

import numpy as np
import pytest
import torch
import torch.distributed as dist

from diffusion.process import (
    GaussianDiffusion,
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from diffusion.process.schedules import get_named_beta_schedule

T = 12


@pytest.fixture
def diffusion():
    return GaussianDiffusion(
        betas=get_named_beta_schedule("cosine", T),
        model_mean_type="epsilon",
        model_var_type="fixed_small",
        loss_type="mse",
    )


def fill(sampler, rounds=10, seed=0):
    """Feed `rounds` losses to every t; L_t has second moment growing with t."""
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        ts = list(range(T))
        sampler.update_with_all_losses(ts, list((1 + np.arange(T)) * rng.uniform(0.5, 1.5, T)))


def test_names_and_errors(diffusion):
    assert isinstance(create_named_schedule_sampler("uniform", diffusion), UniformSampler)
    assert isinstance(
        create_named_schedule_sampler("loss-second-moment", diffusion), LossSecondMomentResampler
    )
    with pytest.raises(
        ValueError, match=r"'loss_second_moment'.*\['loss-second-moment', 'uniform'\]"
    ):
        create_named_schedule_sampler("loss_second_moment", diffusion)


def test_uniform_sampler_gives_unit_weights(diffusion):
    t, w = create_named_schedule_sampler("uniform", diffusion).sample(
        500, "cpu", generator=torch.Generator().manual_seed(0)
    )
    assert t.dtype == torch.int64 and t.shape == (500,) and 0 <= t.min() and t.max() < T
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.ones(500), rtol=0, atol=0)
    assert len(set(t.tolist())) == T


def test_warm_up_is_uniform_until_every_t_has_ten_losses(diffusion):
    sampler = LossSecondMomentResampler(diffusion)
    fill(sampler, rounds=9)
    sampler.update_with_all_losses(list(range(T - 1)), [5.0] * (T - 1))  # the last t has only 9
    np.testing.assert_array_equal(sampler.weights(), np.ones(T))
    sampler.update_with_all_losses([T - 1], [5.0])
    assert not np.allclose(sampler.weights(), sampler.weights().mean())


def test_weights_are_root_mean_square_losses_mixed_with_uniform(diffusion):
    sampler = LossSecondMomentResampler(diffusion)
    history = np.random.default_rng(1).uniform(0.1, 3.0, size=(T, 14))
    for k in range(14):  # 14 rounds: only the last 10 of each t may count
        sampler.update_with_all_losses(list(range(T)), list(history[:, k]))
    rms = np.sqrt((history[:, -10:] ** 2).mean(axis=1))
    expected = 0.999 * rms / rms.sum() + 0.001 / T
    np.testing.assert_allclose(sampler.weights(), expected, rtol=1e-12)
    np.testing.assert_allclose(sampler.probs().sum(), 1.0, rtol=1e-12)


def test_importance_weights_keep_the_objective_unbiased(diffusion):
    sampler = LossSecondMomentResampler(diffusion)
    fill(sampler)
    losses = torch.linspace(0.3, 4.0, T, dtype=torch.float64)
    p = sampler.probs()
    t, w = sampler.sample(4000, "cpu", generator=torch.Generator().manual_seed(3))
    # each returned weight is 1/(T p_t) for its t ...
    torch.testing.assert_close(
        w, torch.from_numpy(1 / (T * p[t.numpy()])).float(), rtol=1e-6, atol=0
    )
    # ... so E_t[w_t L_t] = Σ_t p_t · 1/(T p_t) · L_t = mean_t L_t, exactly
    exact = float(np.sum(p * (1 / (T * p)) * losses.numpy()))
    assert exact == pytest.approx(float(losses.mean()), rel=1e-12)
    # and the draws follow p (5-sigma per bin)
    freq = np.bincount(t.numpy(), minlength=T) / 4000
    assert (np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / 4000) + 1e-12).all()


def test_state_dict_round_trip_restores_the_sampler_exactly(diffusion):
    sampler = LossSecondMomentResampler(diffusion)
    fill(sampler, rounds=12)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # checkpoints load with weights_only
    restored = LossSecondMomentResampler(diffusion)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.weights(), sampler.weights())
    for s in (sampler, restored):  # and both evolve identically afterwards
        s.update_with_all_losses([0, 3, 3], [9.0, 0.1, 0.2])
    np.testing.assert_array_equal(restored.weights(), sampler.weights())
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(sampler.sample(16, "cpu", g1)[0], restored.sample(16, "cpu", g2)[0])


def test_load_state_dict_rejects_a_different_process(diffusion):
    sampler = LossSecondMomentResampler(diffusion)
    bad = {
        "loss_history": torch.zeros(T + 1, 10),
        "loss_counts": torch.zeros(T + 1, dtype=torch.int64),
    }
    with pytest.raises(ValueError, match="expected"):
        sampler.load_state_dict(bad)
    assert UniformSampler(diffusion).state_dict() == {}


def test_local_losses_without_distributed_update_directly(diffusion):
    a, b = LossSecondMomentResampler(diffusion), LossSecondMomentResampler(diffusion)
    ts = torch.arange(T).repeat(10)
    losses = torch.rand(10 * T, generator=torch.Generator().manual_seed(0), requires_grad=True)
    a.update_with_local_losses(ts, losses)
    b.update_with_all_losses(ts.tolist(), losses.tolist())
    np.testing.assert_array_equal(a.weights(), b.weights())


def test_local_losses_under_a_single_rank_process_group(diffusion, tmp_path):
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1
        )
    except Exception as err:  # sandboxes without a usable network interface
        pytest.skip(f"gloo unavailable: {err}")
    try:
        a, b = LossSecondMomentResampler(diffusion), LossSecondMomentResampler(diffusion)
        ts = torch.arange(T).repeat(10)
        losses = torch.linspace(0.1, 2.0, 10 * T)
        a.update_with_local_losses(ts, losses)
        b.update_with_all_losses(ts.tolist(), losses.tolist())
        np.testing.assert_array_equal(a.weights(), b.weights())
    finally:
        dist.destroy_process_group()


def test_non_finite_losses_leave_the_history_untouched(diffusion):
    clean, fed = LossSecondMomentResampler(diffusion), LossSecondMomentResampler(diffusion)
    fill(clean)
    fill(fed)
    fed.update_with_all_losses([0, 3, 5], [float("nan"), float("inf"), -float("inf")])
    np.testing.assert_array_equal(fed.weights(), clean.weights())
    assert np.isfinite(fed.weights()).all()
