"""Respacing (IDDPM sec. 4, eq. 19; DDIM sec. 4.2) against the base process."""

import math

import numpy as np
import pytest
import torch

from diffusion.process import GaussianDiffusion, SpacedDiffusion, space_timesteps
from diffusion.process.schedules import get_named_beta_schedule

F64 = torch.float64
KW = {"model_mean_type": "epsilon", "model_var_type": "learned_range", "loss_type": "rescaled_mse"}


def test_ddim50_keeps_every_20th_step():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == set(range(1000))


def test_impossible_ddim_stride_is_an_error():
    # strides 1..10 of 10 steps give 10, 5, 4, 3, 2, 2, 2, 2, 2, 1 steps: never 7
    with pytest.raises(ValueError, match="exactly 7 steps of 10"):
        space_timesteps(10, "ddim7")
    with pytest.raises(ValueError, match="ddimX"):
        space_timesteps(10, "ddimX")


def test_sections_are_strided_evenly_with_both_ends():
    # 300 steps, three sections of 100: k·99/(n−1) rounded, offset by the section start
    steps = space_timesteps(300, [10, 15, 20])
    expected = set()
    for start, n in [(0, 10), (100, 15), (200, 20)]:
        expected |= {start + round(k * 99 / (n - 1)) for k in range(n)}
    assert steps == expected and len(steps) == 45
    assert space_timesteps(300, "10,15,20") == steps
    assert space_timesteps(100, 10) == {round(k * 11) for k in range(10)}
    assert space_timesteps(10, [1]) == {0}


def test_uneven_sections_give_the_first_ones_an_extra_step():
    # 10 steps in 3 sections: sizes 4, 3, 3 -> all kept
    assert space_timesteps(10, [4, 3, 3]) == set(range(10))


@pytest.mark.parametrize("counts", [[5, 0], [11], "a,b", 2.5, [True]])
def test_bad_section_counts_are_errors(counts):
    with pytest.raises(ValueError):
        space_timesteps(10, counts)


def test_keeping_every_step_reproduces_the_base_process():
    betas = get_named_beta_schedule("cosine", 50)
    base = GaussianDiffusion(betas=betas, **KW)
    spaced = SpacedDiffusion(range(50), betas=betas, **KW)
    torch.testing.assert_close(
        torch.from_numpy(spaced.betas), torch.from_numpy(betas), rtol=1e-12, atol=1e-15
    )
    for name in [
        "alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
    ]:
        torch.testing.assert_close(
            torch.from_numpy(getattr(spaced, name)),
            torch.from_numpy(getattr(base, name)),
            rtol=1e-12,
            atol=1e-15,
        )
    assert spaced.original_num_steps == 50 and spaced.num_timesteps == 50


def test_respaced_alpha_bar_equals_the_original_at_kept_steps():
    betas = get_named_beta_schedule("linear", 1000)
    use = space_timesteps(1000, "ddim50")
    spaced = SpacedDiffusion(use, betas=betas, **KW)
    kept = np.array(sorted(use))
    alpha_bar = np.cumprod(1 - betas)
    assert spaced.timestep_map.dtype == np.int64 and (spaced.timestep_map == kept).all()
    torch.testing.assert_close(
        torch.from_numpy(spaced.alphas_cumprod),
        torch.from_numpy(alpha_bar[kept]),
        rtol=1e-12,
        atol=0,
    )
    assert spaced.num_timesteps == 50 and spaced.original_num_steps == 1000


def test_constructor_does_not_mutate_kwargs_and_validates_steps():
    kwargs = {"betas": get_named_beta_schedule("cosine", 10), **KW}
    SpacedDiffusion({0, 5}, **kwargs)
    assert len(kwargs["betas"]) == 10
    with pytest.raises(ValueError, match="out of range"):
        SpacedDiffusion({0, 10}, **kwargs)
    with pytest.raises(ValueError, match="non-empty"):
        SpacedDiffusion(set(), **kwargs)


class Recorder:
    """A model that records the timesteps it receives and predicts zero noise."""

    def __init__(self, channels=2):
        self.seen, self.channels = [], channels

    def __call__(self, x, t, **kwargs):
        self.seen.append(t.clone())
        return torch.zeros(x.shape[0], self.channels * x.shape[1], *x.shape[2:], dtype=x.dtype)


@pytest.mark.parametrize("rescale", [False, True])
def test_model_receives_original_indices(rescale):
    betas = get_named_beta_schedule("linear", 100)
    spaced = SpacedDiffusion(
        space_timesteps(100, "ddim10"), betas=betas, rescale_timesteps=rescale, **KW
    )
    model = Recorder()
    x = torch.zeros(3, 1, 2, 2, dtype=F64)
    t = torch.tensor([0, 4, 9])
    spaced.p_mean_variance(model, x, t)
    spaced.training_losses(model, x, t)
    spaced.ddim_sample_loop(model, (3, 1, 2, 2))
    expected = torch.tensor([0, 40, 90])
    if rescale:
        expected = expected.float() * 1000.0 / 100
    for seen in model.seen[:2]:  # p_mean_variance, training_losses
        torch.testing.assert_close(seen, expected, rtol=0, atol=0)
    loop_ts = [int(s[0]) if not rescale else round(float(s[0]) / 10) for s in model.seen[2:]]
    assert loop_ts == list(range(90, -1, -10))
    torch.testing.assert_close(spaced.model_timesteps(t), expected, rtol=0, atol=0)


def test_ddim_on_a_respaced_process_with_the_oracle_ends_at_x_start():
    betas = get_named_beta_schedule("cosine", 200)
    alpha_bar = np.cumprod(1 - betas)
    spaced = SpacedDiffusion(
        space_timesteps(200, "ddim20"), betas=betas, **{**KW, "model_var_type": "fixed_small"}
    )
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 2, 2, generator=g, dtype=F64) * 2 - 1

    def oracle(x, t):  # ε from ORIGINAL indices t and the base ᾱ
        a = torch.from_numpy(np.sqrt(alpha_bar)[t.numpy()]).view(-1, 1, 1, 1)
        return (x - a * x0) / (1 - a**2).sqrt()

    x_T = math.sqrt(alpha_bar[190]) * x0 + math.sqrt(1 - alpha_bar[190]) * torch.randn(
        x0.shape, generator=g, dtype=F64
    )
    out = spaced.ddim_sample_loop(oracle, x0.shape, noise=x_T)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)
