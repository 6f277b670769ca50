"""Min-SNR-γ loss weighting (Hang et al. 2023, arXiv 2303.09556) and zero-terminal-SNR
schedules (Lin et al. 2023, arXiv 2305.08891), against closed forms computed here from the
betas alone."""

from __future__ import annotations

import math
import warnings

import hydra
import numpy as np
import pytest
import torch

from diffusion import GaussianDiffusion, get_named_beta_schedule
from diffusion.process.schedules import rescale_zero_terminal_snr
from diffusion.sampling import DDIMSampler, DDPMSampler

T = 20
BETAS = get_named_beta_schedule("cosine", T)
TARGETS = ["epsilon", "start_x", "v"]
VAR_TYPES = ["fixed_small", "fixed_large", "learned", "learned_range"]


def make(mean_type="epsilon", var_type="fixed_small", loss_type="mse", betas=BETAS, **kw):
    return GaussianDiffusion(betas=betas, model_mean_type=mean_type, model_var_type=var_type,
                             loss_type=loss_type, **kw)


def snr(betas=BETAS) -> np.ndarray:
    alpha_bar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    return alpha_bar / (1.0 - alpha_bar)


def random_model(var_type="fixed_small", seed=1):
    """Returns a fixed random output of the shape the process expects (mean part first)."""

    def model(x, t, **kwargs):
        g = torch.Generator().manual_seed(seed)
        channels = x.shape[1] * (2 if var_type in ("learned", "learned_range") else 1)
        out = torch.randn(x.shape[0], channels, *x.shape[2:], generator=g, dtype=x.dtype)
        if var_type == "learned_range":
            out[:, x.shape[1]:] = out[:, x.shape[1]:].tanh()  # keep v in [-1, 1]
        return out

    return model


def batch(seed=0, n=T):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    return x0, noise, torch.arange(n) % T


def losses(diffusion, model, seed=0):
    x0, noise, t = batch(seed)
    return diffusion.training_losses(model, x0, t, noise=noise), (x0, noise, t)


# ---------------------------------------------------------------------- Min-SNR weights
@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_min_snr_weights_are_the_closed_forms(gamma):
    s = snr()
    assert (s > gamma).any() and (s < gamma).any()  # both branches of the min are exercised
    want = {
        "start_x": np.minimum(s, gamma),
        "epsilon": np.minimum(s, gamma) / s,
        "v": np.minimum(s, gamma) / (s + 1),
    }
    for target, weights in want.items():
        process = make(target, loss_weighting="min_snr", min_snr_gamma=gamma)
        np.testing.assert_allclose(process.mse_loss_weights, weights, rtol=1e-12, atol=0)
    # spot values: where SNR_t ≤ γ the ε weight is exactly 1, elsewhere γ/SNR_t
    eps = make("epsilon", loss_weighting="min_snr", min_snr_gamma=gamma).mse_loss_weights
    assert (eps[s <= gamma] == 1.0).all()
    np.testing.assert_allclose(eps[s > gamma], gamma / s[s > gamma], rtol=1e-12)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("var_type", ["fixed_large", "learned_range"])
def test_weighted_mse_is_min_snr_times_the_implied_x0_error(target, var_type):
    """For every target, Min-SNR-γ makes the MSE term min(SNR_t, γ)·‖x̂_0 − x_0‖² with x̂_0
    the prediction the output implies (Hang et al. sec. 3.4); x̂_0 is derived here."""
    gamma = 2.0
    loss_type = "rescaled_mse" if var_type == "learned_range" else "mse"
    process = make(target, var_type, loss_type, loss_weighting="min_snr", min_snr_gamma=gamma)
    model = random_model(var_type)
    terms, (x0, noise, t) = losses(process, model)
    out = model(x0, t)[:, :2]
    alpha_bar = torch.from_numpy(np.cumprod(1 - BETAS))[t].view(-1, 1, 1, 1)
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x_t = a * x0 + b * noise
    x0_hat = {"start_x": out, "epsilon": (x_t - b * out) / a, "v": a * x_t - b * out}[target]
    want = torch.from_numpy(np.minimum(snr(), gamma))[t] * ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"], want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms.get("vb", 0.0), rtol=0, atol=0)


@pytest.mark.parametrize("target", TARGETS)
def test_a_gamma_above_every_snr_gives_the_epsilon_loss(target):
    """γ ≥ max SNR: the ε weight is 1 (the plain loss, bit for bit), x_0's is SNR_t and v's is
    ᾱ_t, and both then equal the ε loss of the ε̂ their output implies."""
    gamma = float(snr().max()) * 2
    process = make(target, loss_weighting="min_snr", min_snr_gamma=gamma)
    terms, (x0, noise, t) = losses(process, random_model())
    plain, _ = losses(make(target), random_model())
    alpha_bar = np.cumprod(1 - BETAS)
    want_weights = {"epsilon": np.ones(T), "start_x": snr(), "v": alpha_bar}[target]
    np.testing.assert_allclose(process.mse_loss_weights, want_weights, rtol=1e-12)
    if target == "epsilon":
        assert torch.equal(terms["loss"], plain["loss"])
        return
    out = random_model()(x0, t)
    eps_hat = {
        "start_x": process._predict_eps_from_xstart(process.q_sample(x0, t, noise), t, out),
        "v": process._predict_eps_from_v(process.q_sample(x0, t, noise), t, out),
    }[target]
    torch.testing.assert_close(terms["mse"], ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3)),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("target", [*TARGETS, "previous_x"])
@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_none_reproduces_the_unweighted_losses_exactly(target, var_type):
    loss_type = "rescaled_mse" if var_type.startswith("learned") else "mse"
    default = make(target, var_type, loss_type)
    assert default.loss_weighting.value == "none" and default.mse_loss_weights is None
    model = random_model(var_type)
    terms, (x0, noise, t) = losses(default, model)
    explicit, _ = losses(make(target, var_type, loss_type, loss_weighting="none"), model)
    for key in terms:
        assert torch.equal(terms[key], explicit[key])
    x_t = default.q_sample(x0, t, noise)
    target_value = {
        "epsilon": noise,
        "start_x": x0,
        "v": default.get_v(x0, noise, t),
        "previous_x": default.q_posterior_mean_variance(x0, x_t, t)[0],
    }[target]
    want = ((target_value - model(x0, t)[:, :2]) ** 2).mean(dim=[1, 2, 3])
    assert torch.equal(terms["mse"], want)


def test_min_snr_leaves_the_vb_term_alone():
    model = random_model("learned_range")
    plain, _ = losses(make("v", "learned_range", "rescaled_mse"), model)
    weighted, (_, _, t) = losses(
        make("v", "learned_range", "rescaled_mse", loss_weighting="min_snr"), model
    )
    assert torch.equal(plain["vb"], weighted["vb"])
    weights = torch.from_numpy(np.minimum(snr(), 5.0) / (snr() + 1))[t]
    torch.testing.assert_close(weighted["mse"], plain["mse"] * weights, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mean_type="previous_x", loss_weighting="min_snr"), "model_mean_type='previous_x'"),
    (dict(loss_type="kl", loss_weighting="min_snr"), "loss_type='kl'"),
    (dict(loss_weighting="snr"), "invalid loss_weighting 'snr'.*'none', 'min_snr'"),
    (dict(loss_weighting="min_snr", min_snr_gamma=0.0), "min_snr_gamma must be a positive"),
    (dict(min_snr_gamma=float("inf")), "min_snr_gamma must be a positive"),
    (dict(min_snr_gamma=True), "min_snr_gamma must be a positive"),
])
def test_bad_weighting_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


# ----------------------------------------------------------------- zero terminal SNR
@pytest.mark.parametrize("name, steps", [("cosine", 20), ("linear", 1000), ("cosine", 4000)])
def test_rescaled_schedule_follows_lin_et_al(name, steps):
    old = get_named_beta_schedule(name, steps)
    new = get_named_beta_schedule(name, steps, zero_terminal_snr=True)
    assert np.array_equal(old, get_named_beta_schedule(name, steps, zero_terminal_snr=False))
    assert new[-1] == 1.0 and ((new > 0) & (new <= 1)).all()
    s_old = np.sqrt(np.cumprod(1 - old))
    s_new = np.sqrt(np.cumprod(1 - new))
    assert s_new[-1] == 0.0
    np.testing.assert_allclose(s_new[0], s_old[0], rtol=1e-12)
    # Lin et al. Alg. 1: √ᾱ shifted by its last value and scaled to keep its first
    want = (s_old - s_old[-1]) * s_old[0] / (s_old[0] - s_old[-1])
    np.testing.assert_allclose(s_new, want, rtol=1e-9, atol=1e-15)
    process = make("v", betas=new)
    assert process.alphas_cumprod[-1] == 0.0 and process.zero_terminal_snr
    assert not make("v", betas=old).zero_terminal_snr


def test_rescale_needs_a_decreasing_schedule():
    with pytest.raises(ValueError, match="at least 2 betas"):
        rescale_zero_terminal_snr(np.array([0.5]))
    with pytest.raises(ValueError, match="zero_terminal_snr must be true or false"):
        get_named_beta_schedule("cosine", 10, zero_terminal_snr="yes")


def test_epsilon_with_zero_terminal_snr_is_refused():
    betas = get_named_beta_schedule("cosine", T, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="ill-posed with zero terminal SNR.*model_mean_type=v"):
        make("epsilon", betas=betas)


ZERO_SNR_CASES = [
    (target, var_type)
    for target in ("v", "start_x", "previous_x")
    for var_type in ("fixed_small", "fixed_large", "learned_range")
]


@pytest.mark.parametrize("target, var_type", ZERO_SNR_CASES)
def test_zero_terminal_snr_process_stays_finite(target, var_type):
    betas = get_named_beta_schedule("cosine", T, zero_terminal_snr=True)
    kw = {} if target == "previous_x" else {"loss_weighting": "min_snr"}
    loss_type = "rescaled_mse" if var_type == "learned_range" else "mse"
    process = make(target, var_type, loss_type, betas=betas, **kw)
    model = random_model(var_type)
    x0, noise, _ = batch(n=4)
    last = torch.full((4,), T - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy divide-by-zero on the way either
        results = [
            *process.training_losses(model, x0, last, noise=noise).values(),
            *process.p_mean_variance(model, noise, last).values(),
            process.ddim_sample(model, noise, last)["sample"],
            process.p_sample_loop(model, (4, 2, 3, 3), generator=torch.Generator().manual_seed(0)),
            process.ddim_sample_loop(model, (4, 2, 3, 3), eta=1.0),
            *process.calc_bpd_loop(model, x0).values(),
        ]
        for sampler in (DDPMSampler(steps=5), DDIMSampler(steps=None, respacing="5")):
            results.append(sampler(process, model, shape=(4, 2, 3, 3)))  # both keep t = T−1
    for value in results:
        assert torch.isfinite(value).all()
    assert torch.equal(process._prior_bpd(x0), torch.zeros(4, dtype=torch.float64))


def test_v_oracle_at_the_pure_noise_step():
    """At ᾱ = 0, v = −x_0 and x_T = ε: the v oracle still gives x̂_0 = x_0, and DDIM's ε̂ is x_T."""
    process = make("v", betas=get_named_beta_schedule("cosine", T, zero_terminal_snr=True))
    x0, noise, _ = batch(n=3)
    last = torch.full((3,), T - 1)
    x_t = process.q_sample(x0, last, noise)
    assert torch.equal(x_t, noise)
    out = process.p_mean_variance(lambda x, t: -x0, x_t, last, clip_denoised=False)
    assert torch.equal(out["pred_xstart"], x0)
    torch.testing.assert_close(process._predict_eps_from_xstart(x_t, last, x0), noise,
                               rtol=0, atol=0)


def test_configs_select_the_new_keys(compose_cfg):
    cfg = compose_cfg("train", ["experiment=cifar_cosine_v_minsnr"])
    process = hydra.utils.instantiate(cfg.diffusion)
    assert process.model_mean_type.value == "v" and process.loss_weighting.value == "min_snr"
    assert process.min_snr_gamma == 5.0 and process.model_var_type.value == "fixed_large"
    assert cfg.diffusion.betas.schedule_name == "cosine" and process.loss_type.value == "mse"
    cfg = compose_cfg("train", ["diffusion.model_mean_type=v",
                                "diffusion.betas.zero_terminal_snr=true"])
    assert hydra.utils.instantiate(cfg.diffusion).alphas_cumprod[-1] == 0.0
    cfg = compose_cfg("train", ["experiment=cifar_cond_cfg"])
    assert cfg.class_cond and cfg.module.label_dropout == 0.1
    default = compose_cfg("train", [])
    assert default.diffusion.loss_weighting == "none" and default.module.label_dropout == 0.0
    assert not default.diffusion.betas.zero_terminal_snr
    assert math.isclose(default.diffusion.min_snr_gamma, 5.0)
