"""GaussianDiffusion against closed forms computed here, in float64 (DDPM, IDDPM, DDIM)."""

import inspect
import math

import numpy as np
import pytest
import torch

from diffusion.process import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from diffusion.process.losses import discretized_gaussian_log_likelihood
from diffusion.process.schedules import get_named_beta_schedule

F64 = torch.float64
T = 20
MEAN_TYPES = ["epsilon", "start_x", "previous_x", "v"]
VAR_TYPES = ["fixed_small", "fixed_large", "learned", "learned_range"]
BETAS = get_named_beta_schedule("cosine", T)


def make(mean_type="epsilon", var_type="fixed_small", loss_type="mse", betas=BETAS, **kw):
    return GaussianDiffusion(
        betas=betas, model_mean_type=mean_type, model_var_type=var_type, loss_type=loss_type, **kw
    )


def alpha_bars(betas):
    """ᾱ_t and ᾱ_{t-1} by an explicit product, independent of the class."""
    out, acc = [], 1.0
    for beta in betas:
        acc *= 1.0 - beta
        out.append(acc)
    ab = np.array(out)
    return ab, np.append(1.0, ab[:-1])


def col(values, t, ndim=4):
    """Gather a float64 array at t and shape it (B, 1, ..., 1) for broadcasting."""
    return torch.as_tensor(np.asarray(values)[t.numpy()], dtype=F64).view(-1, *([1] * (ndim - 1)))


def data(batch=T, seed=0, shape=(1, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((batch, *shape), generator=g, dtype=F64) * 2 - 1
    eps = torch.randn((batch, *shape), generator=g, dtype=F64)
    t = torch.arange(batch) % T
    return x0, eps, t


def oracle_target(mean_type, x0, eps, t, betas=BETAS, t_is_original=True):
    """What a perfect network outputs, from the test's own closed forms."""
    ab, abp = alpha_bars(betas)
    a, b = col(np.sqrt(ab), t, x0.ndim), col(np.sqrt(1 - ab), t, x0.ndim)
    if mean_type == "epsilon":
        return eps
    if mean_type == "start_x":
        return x0
    if mean_type == "v":
        return a * eps - b * x0
    # previous_x: the product-of-Gaussians posterior mean of x_{t-1}
    return posterior_by_product(x0, a * x0 + b * eps, t, betas)[0]


def posterior_by_product(x0, x_t, t, betas):
    """q(x_{t-1}|x_t,x_0) ∝ N(x_t; √α_t x_{t-1}, β_t) · N(x_{t-1}; √ᾱ_{t-1} x_0, 1 − ᾱ_{t-1})."""
    ab, abp = alpha_bars(betas)
    beta, abp_t = col(betas, t, x0.ndim), col(abp, t, x0.ndim)
    alpha = 1 - beta
    at_zero = (t == 0).view(-1, *([1] * (x0.ndim - 1)))
    prec = alpha / beta + 1 / torch.where(at_zero, torch.ones_like(abp_t), 1 - abp_t)
    var = torch.where(at_zero, torch.zeros_like(prec), 1 / prec)
    mean = var * (alpha.sqrt() * x_t / beta + abp_t.sqrt() * x0 / (1 - abp_t))
    mean = torch.where(at_zero, x0, mean)  # ᾱ_{-1} = 1: the prior on x_{t-1} is a point mass
    return mean, var


def constant_model(output):
    return lambda x, t, **kwargs: output


# ------------------------------------------------------------------- construction
def test_choices_accept_strings_and_members_and_are_str_valued():
    d = make(ModelMeanType.V, "learned_range", LossType.RESCALED_MSE)
    assert d.model_mean_type is ModelMeanType.V and d.model_var_type is ModelVarType.LEARNED_RANGE
    assert d.loss_type is LossType.RESCALED_MSE and ModelMeanType.EPSILON.value == "epsilon"
    assert d.num_timesteps == T and d.betas.dtype == np.float64 and d.rescale_timesteps is False


@pytest.mark.parametrize(
    "arg,bad,choices",
    [
        ("model_mean_type", "eps", "'epsilon'"),
        ("model_var_type", 3, "'learned_range'"),
        ("loss_type", "hybrid", "'rescaled_mse'"),
    ],
)
def test_bad_choice_names_the_value_and_the_choices(arg, bad, choices):
    kwargs = {"mean_type": "epsilon", "var_type": "fixed_small", "loss_type": "mse"}
    kwargs[
        {"model_mean_type": "mean_type", "model_var_type": "var_type", "loss_type": "loss_type"}[
            arg
        ]
    ] = bad
    with pytest.raises(ValueError, match=f"{arg}.*{bad!r}.*{choices}"):
        make(**kwargs)


@pytest.mark.parametrize("betas", [np.array([0.1, 0.0]), np.array([[0.1]]), np.array([0.5, 1.5])])
def test_bad_betas_are_rejected(betas):
    with pytest.raises(ValueError, match="betas"):
        make(betas=betas)


# ---------------------------------------------------------------- forward process
def test_q_mean_variance_is_the_closed_form():
    d = make()
    x0, _, t = data()
    ab, _ = alpha_bars(BETAS)
    mean, var, log_var = d.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, col(np.sqrt(ab), t) * x0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(var, col(1 - ab, t).expand_as(x0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        log_var, col(np.log(1 - ab), t).expand_as(x0), rtol=1e-12, atol=1e-14
    )


def test_q_sample_moments_by_monte_carlo():
    d = make()
    n = 20_000
    t = torch.full((n,), 7)
    x0 = torch.full((n, 1), 0.6, dtype=F64)
    x_t = d.q_sample(
        x0, t, noise=torch.randn(n, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    )
    ab = alpha_bars(BETAS)[0][7]
    assert abs(x_t.mean() - math.sqrt(ab) * 0.6) < 5 * math.sqrt((1 - ab) / n)
    assert abs(x_t.var() - (1 - ab)) < 5 * (1 - ab) * math.sqrt(2 / n)


def test_q_sample_with_zero_noise_or_zero_data():
    d = make()
    x0, eps, t = data()
    ab, _ = alpha_bars(BETAS)
    torch.testing.assert_close(
        d.q_sample(x0, t, noise=torch.zeros_like(x0)),
        col(np.sqrt(ab), t) * x0,
        rtol=1e-12,
        atol=1e-14,
    )
    torch.testing.assert_close(
        d.q_sample(torch.zeros_like(x0), t, noise=eps),
        col(np.sqrt(1 - ab), t) * eps,
        rtol=1e-12,
        atol=1e-14,
    )


def test_posterior_matches_product_of_gaussians():
    d = make()
    x0, eps, t = data()
    x_t = d.q_sample(x0, t, noise=eps)
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, t)
    exp_mean, exp_var = posterior_by_product(x0, x_t, t, BETAS)
    torch.testing.assert_close(mean, exp_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, exp_var.expand_as(x0), rtol=1e-10, atol=1e-14)
    # log-variance clipped at t = 0 (where β̃ = 0) to log β̃ at t = 1
    clipped = torch.where(t == 0, torch.ones_like(t), t)
    torch.testing.assert_close(
        log_var,
        torch.log(posterior_by_product(x0, x_t, clipped, BETAS)[1]).expand_as(x0),
        rtol=1e-10,
        atol=1e-12,
    )


def test_posterior_spot_values():
    d = make()
    x0, _, t = data()
    ab, abp = alpha_bars(BETAS)
    mean, var, _ = d.q_posterior_mean_variance(x0, col(np.sqrt(ab), t) * x0, t)
    torch.testing.assert_close(mean, col(np.sqrt(abp), t) * x0, rtol=1e-10, atol=1e-12)
    expected = col(BETAS * (1 - abp) / (1 - ab), t)
    torch.testing.assert_close(var, expected.expand_as(x0), rtol=1e-12, atol=0)
    assert (var[t == 0] == 0).all()


# ------------------------------------------------------------------- conversions
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_every_parameterisation_converts_to_x0_eps_v_and_back(dtype):
    d = make()
    x0, eps, t = data()
    x0, eps = x0.to(dtype), eps.to(dtype)
    x_t = d.q_sample(x0, t, noise=eps)
    assert x_t.dtype == dtype
    v = d.get_v(x0, eps, t)
    xprev = d.q_posterior_mean_variance(x0, x_t, t)[0]
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == F64 else {"rtol": 1e-3, "atol": 2e-3}
    torch.testing.assert_close(v, oracle_target("v", x0.double(), eps.double(), t).to(dtype), **tol)
    torch.testing.assert_close(d._predict_xstart_from_eps(x_t, t, eps), x0, **tol)
    torch.testing.assert_close(d._predict_eps_from_xstart(x_t, t, x0), eps, **tol)
    torch.testing.assert_close(d._predict_xstart_from_v(x_t, t, v), x0, **tol)
    torch.testing.assert_close(d._predict_eps_from_v(x_t, t, v), eps, **tol)
    if dtype == F64:  # 1/coef1 reaches ~1e3 at large t: float32 loses digits there
        torch.testing.assert_close(d._predict_xstart_from_xprev(x_t, t, xprev), x0, **tol)


# ----------------------------------------------------------------- reverse process
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("clip", [False, True])
def test_oracle_gives_pred_xstart_equal_to_x_start(mean_type, var_type, clip):
    d = make(mean_type, var_type)
    x0, eps, t = data()
    out = oracle_target(mean_type, x0, eps, t)
    if var_type in ("learned", "learned_range"):
        out = torch.cat([out, torch.zeros_like(out)], dim=1)
    x_t = d.q_sample(x0, t, noise=eps)
    res = d.p_mean_variance(constant_model(out), x_t, t, clip_denoised=clip)
    torch.testing.assert_close(res["pred_xstart"], x0, rtol=1e-8, atol=1e-9)
    exp_mean, _ = posterior_by_product(x0, x_t, t, BETAS)
    torch.testing.assert_close(res["mean"], exp_mean, rtol=1e-8, atol=1e-9)
    assert res["variance"].shape == res["log_variance"].shape == x0.shape


def test_variance_types_decode_as_improved_diffusion():
    x0, eps, t = data()
    ab, abp = alpha_bars(BETAS)
    post = BETAS * (1 - abp) / (1 - ab)
    log_post_clipped = np.log(np.append(post[1], post[1:]))
    x_t = make().q_sample(x0, t, noise=eps)
    expected = {
        "fixed_small": (post, log_post_clipped),
        "fixed_large": (np.append(post[1], BETAS[1:]), np.log(np.append(post[1], BETAS[1:]))),
    }
    for var_type, (var, log_var) in expected.items():
        res = make("epsilon", var_type).p_mean_variance(constant_model(eps), x_t, t)
        torch.testing.assert_close(res["variance"], col(var, t).expand_as(x0), rtol=1e-12, atol=0)
        torch.testing.assert_close(
            res["log_variance"], col(log_var, t).expand_as(x0), rtol=1e-12, atol=0
        )
    for value, log_var in [
        (-1.0, log_post_clipped),
        (1.0, np.log(BETAS)),
        (0.0, (log_post_clipped + np.log(BETAS)) / 2),
    ]:
        out = torch.cat([eps, torch.full_like(eps, value)], dim=1)
        res = make("epsilon", "learned_range").p_mean_variance(constant_model(out), x_t, t)
        torch.testing.assert_close(
            res["log_variance"], col(log_var, t).expand_as(x0), rtol=1e-12, atol=1e-12
        )
    out = torch.cat([eps, torch.full_like(eps, -3.0)], dim=1)
    res = make("epsilon", "learned").p_mean_variance(constant_model(out), x_t, t)
    torch.testing.assert_close(
        res["variance"], torch.full_like(x0, math.exp(-3.0)), rtol=1e-12, atol=0
    )


def test_wrong_output_channels_is_a_clear_error():
    x0, eps, t = data()
    with pytest.raises(ValueError, match=r"expected \(20, 2, 2, 2\).*learned_range"):
        make("epsilon", "learned_range").p_mean_variance(constant_model(eps), x0, t)
    with pytest.raises(ValueError, match=r"expected \(20, 2, 2, 2\).*learned"):
        make("epsilon", "learned", "rescaled_mse").training_losses(constant_model(eps), x0, t)
    with pytest.raises(ValueError, match=r"expected \(20, 1, 2, 2\).*fixed_small"):
        make("epsilon", "fixed_small").training_losses(
            constant_model(torch.cat([eps, eps], 1)), x0, t
        )


@pytest.mark.parametrize(
    "var_type, learned",
    [("fixed_small", False), ("fixed_large", False), ("learned", True), ("learned_range", True)],
)
def test_learned_variances_double_the_output_width(var_type, learned):
    # IDDPM sec. 3.1: Σ_θ takes C more channels, after the mean's C
    assert ModelVarType(var_type).is_learned() is learned
    assert make("epsilon", var_type).model_output_channels(3) == (6 if learned else 3)


def test_init_kwargs_hold_every_constructor_argument():
    # respace() copies init_kwargs: an argument missing here would silently fall back to
    # its default in every respaced process (as loss_weighting and min_snr_gamma once did)
    d = make("v", "learned_range", "rescaled_mse", rescale_timesteps=True,
             loss_weighting="min_snr", min_snr_gamma=2.5)
    kwargs = d.init_kwargs
    assert set(kwargs) == set(inspect.signature(GaussianDiffusion).parameters)
    np.testing.assert_array_equal(kwargs["betas"], d.betas)
    # every argument is kept as the process holds it under its own name
    assert all(kwargs[name] == getattr(d, name) for name in kwargs if name != "betas")
    rebuilt = GaussianDiffusion(**kwargs)
    np.testing.assert_array_equal(rebuilt.mse_loss_weights, d.mse_loss_weights)
    assert (rebuilt.loss_weighting, rebuilt.min_snr_gamma) == ("min_snr", 2.5)


def test_model_sees_indices_or_rescaled_floats():
    seen = []

    def model(x, ts, **kwargs):
        seen.append((ts, kwargs))
        return torch.zeros_like(x)

    x0, _, t = data()
    make().p_mean_variance(model, x0, t, model_kwargs={"y": 3})
    make(rescale_timesteps=True).p_mean_variance(model, x0, t)
    assert seen[0][0].dtype == torch.int64 and torch.equal(seen[0][0], t) and seen[0][1] == {"y": 3}
    torch.testing.assert_close(seen[1][0], t.float() * 1000 / T, rtol=0, atol=0)


def test_denoised_fn_applies_before_clipping():
    x0, eps, t = data()
    res = make("start_x").p_mean_variance(constant_model(x0), x0, t, denoised_fn=lambda x: 3 * x)
    torch.testing.assert_close(res["pred_xstart"], (3 * x0).clamp(-1, 1), rtol=0, atol=0)


# ------------------------------------------------------------------------ sampling
def test_p_sample_adds_no_noise_at_t0_and_posterior_noise_elsewhere():
    d = make("start_x", "fixed_small")
    x0, _, _ = data(batch=4)
    t = torch.tensor([0, 3, 3, 9])
    g = torch.Generator().manual_seed(5)
    out = d.p_sample(constant_model(x0), x0, t, generator=g)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    mean, var = posterior_by_product(x0, x0, t, BETAS)
    torch.testing.assert_close(out["sample"], mean + var.sqrt() * z, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["sample"][0], x0[0], rtol=0, atol=1e-12)


def test_ddim_eta1_is_the_ddpm_step():
    """DDIM sec. 4.1: η = 1 gives σ_t² = β̃_t, the DDPM ancestral step."""
    x0, eps, t = data()
    t = t.clamp(min=1)
    ddpm, ddim = make("epsilon", "fixed_small"), make("epsilon")
    x_t = ddpm.q_sample(x0, t, noise=eps)
    model = constant_model(0.3 * eps)  # any (imperfect) prediction
    a = ddpm.p_sample(
        model, x_t, t, clip_denoised=False, generator=torch.Generator().manual_seed(2)
    )
    b = ddim.ddim_sample(
        model, x_t, t, clip_denoised=False, eta=1.0, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(a["sample"], b["sample"], rtol=1e-9, atol=1e-10)


def eps_oracle(x0, betas=BETAS):
    """Returns the ε that puts x_t on the line through x0: (x_t − √ᾱ x0)/√(1−ᾱ)."""
    ab, _ = alpha_bars(betas)

    def model(x, t, **kwargs):
        return (x - col(np.sqrt(ab), t) * x0) / col(np.sqrt(1 - ab), t)

    return model


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_ddim_eta0_with_the_oracle_ends_exactly_at_x_start(mean_type):
    x0, eps, _ = data(batch=6)
    ab, _ = alpha_bars(BETAS)
    d = make(mean_type)
    eps_model = eps_oracle(x0)

    def model(x, t, **kwargs):  # the same oracle, in the requested parameterisation
        e = eps_model(x, t)
        x_start = x0.expand_as(x)
        return oracle_target(mean_type, x_start, e, t)

    x_T = math.sqrt(ab[-1]) * x0 + math.sqrt(1 - ab[-1]) * eps
    out = d.ddim_sample_loop(model, x0.shape, noise=x_T, eta=0.0)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


def test_sampling_loops_are_reproducible_from_a_generator():
    d = make("epsilon", "fixed_large")
    model = constant_model(torch.zeros(3, 1, 2, 2))
    runs = [
        d.p_sample_loop(model, (3, 1, 2, 2), generator=torch.Generator().manual_seed(s))
        for s in (0, 0, 1)
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.equal(runs[0], runs[2])
    ddim = [
        d.ddim_sample_loop(model, (3, 1, 2, 2), eta=0.5, generator=torch.Generator().manual_seed(s))
        for s in (4, 4)
    ]
    torch.testing.assert_close(ddim[0], ddim[1], rtol=0, atol=0)


def test_progressive_yields_every_step_and_progress_callable_wraps_indices():
    d = make()
    wrapped = []

    def progress(it):
        wrapped.append(list(it))
        return wrapped[-1]

    outs = list(
        d.p_sample_loop_progressive(
            constant_model(torch.zeros(2, 1, 2, 2)), (2, 1, 2, 2), progress=progress
        )
    )
    assert len(outs) == T and wrapped == [list(range(T - 1, -1, -1))]
    assert set(outs[0]) == {"sample", "pred_xstart"}
    with pytest.raises(ValueError, match="noise shape"):
        d.p_sample_loop(constant_model(0), (2, 1, 2, 2), noise=torch.zeros(3, 1, 2, 2))


def test_ddim_reverse_sample_requires_eta_zero():
    x0, _, t = data()
    with pytest.raises(ValueError, match="eta"):
        make().ddim_reverse_sample(constant_model(x0), x0, t, eta=0.5)


# -------------------------------------------------------------------------- losses
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_mse_target_per_mean_type(mean_type):
    d = make(mean_type, "fixed_large", "mse")
    x0, eps, t = data()
    target = oracle_target(mean_type, x0, eps, t)
    perfect = d.training_losses(constant_model(target), x0, t, noise=eps)
    torch.testing.assert_close(perfect["loss"], torch.zeros(T, dtype=F64), rtol=0, atol=1e-20)
    zero = d.training_losses(constant_model(torch.zeros_like(x0)), x0, t, noise=eps)
    torch.testing.assert_close(
        zero["mse"], target.pow(2).mean(dim=(1, 2, 3)), rtol=1e-10, atol=1e-14
    )
    assert set(zero) == {"loss", "mse"}


def _kl_bits(m1, v1, m2, v2):
    p = torch.distributions.Normal(m1, v1.sqrt())
    q = torch.distributions.Normal(m2, v2.sqrt())
    return torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3)) / math.log(2)


def test_vb_terms_are_kl_for_t_positive_and_decoder_nll_at_t0():
    d = make("epsilon", "learned")
    x0, eps, t = data()
    x0 = torch.round((x0 + 1) * 127.5) / 127.5 - 1  # 8-bit data
    x_t = d.q_sample(x0, t, noise=eps)
    log_var = torch.full_like(x0, -4.0) - 0.1 * eps
    out = torch.cat([0.5 * eps, log_var], dim=1)
    vb = d._vb_terms_bpd(constant_model(out), x0, x_t, t, clip_denoised=False)["output"]
    model_mean, _ = posterior_by_product(
        d._predict_xstart_from_eps(x_t, t, 0.5 * eps), x_t, t, BETAS
    )
    true_mean, true_var = posterior_by_product(x0, x_t, t, BETAS)
    kl = _kl_bits(true_mean[1:], true_var[1:].expand_as(x0[1:]), model_mean[1:], log_var[1:].exp())
    torch.testing.assert_close(vb[1:], kl, rtol=1e-9, atol=1e-12)
    nll = -discretized_gaussian_log_likelihood(
        x0[:1], means=model_mean[:1], log_scales=0.5 * log_var[:1]
    )
    torch.testing.assert_close(vb[:1], nll.mean(dim=(1, 2, 3)) / math.log(2), rtol=1e-12, atol=0)


def test_loss_types_scale_the_vb_term_as_improved_diffusion():
    x0, eps, t = data()
    x0 = torch.round((x0 + 1) * 127.5) / 127.5 - 1
    out = torch.cat([0.9 * eps, torch.zeros_like(eps) + 0.3], dim=1)
    losses = {
        lt: make("epsilon", "learned_range", lt).training_losses(
            constant_model(out), x0, t, noise=eps
        )
        for lt in ["mse", "rescaled_mse", "kl", "rescaled_kl"]
    }
    mse, hybrid, kl, rkl = (losses[k] for k in ["mse", "rescaled_mse", "kl", "rescaled_kl"])
    torch.testing.assert_close(
        mse["mse"], (0.1 * eps).pow(2).mean(dim=(1, 2, 3)), rtol=1e-10, atol=1e-14
    )
    torch.testing.assert_close(mse["vb"], kl["loss"], rtol=1e-12, atol=0)  # same term, unscaled
    torch.testing.assert_close(hybrid["vb"], kl["loss"] * T / 1000.0, rtol=1e-12, atol=0)
    torch.testing.assert_close(hybrid["loss"], hybrid["mse"] + hybrid["vb"], rtol=0, atol=0)
    torch.testing.assert_close(rkl["loss"], kl["loss"] * T, rtol=1e-12, atol=0)
    assert set(kl) == {"loss", "vb"} and set(hybrid) == {"loss", "mse", "vb"}


def test_hybrid_vb_term_does_not_reach_the_mean_output():
    """IDDPM sec. 3.1: L_vlb trains Σ only; the mean channels see L_simple alone."""
    d = make("epsilon", "learned_range", "rescaled_mse")
    x0, eps, t = data()
    leaf = torch.cat([0.5 * eps, torch.zeros_like(eps)], dim=1).requires_grad_(True)
    terms = d.training_losses(constant_model(leaf), x0, t, noise=eps)
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), leaf, retain_graph=True)
    assert torch.count_nonzero(grad_vb[:, :1]) == 0
    assert torch.count_nonzero(grad_vb[:, 1:]) == grad_vb[:, 1:].numel()
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), leaf)
    assert torch.count_nonzero(grad_mse[:, 1:]) == 0 and torch.count_nonzero(grad_mse[:, :1]) > 0


def test_prior_bpd_closed_form():
    d = make()
    x0, _, _ = data()
    ab = alpha_bars(BETAS)[0][-1]
    kl = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * x0**2)
    torch.testing.assert_close(
        d._prior_bpd(x0), kl.mean(dim=(1, 2, 3)) / math.log(2), rtol=1e-10, atol=1e-16
    )


def test_calc_bpd_loop_layout_with_an_exact_start_x_model():
    """With x̂_0 = x_0 and Σ = β̃ every KL is 0: only the decoder column (t = 0, last) is not."""
    d = make("start_x", "fixed_small")
    x0, _, _ = data(batch=3)
    x0 = torch.round((x0 + 1) * 127.5) / 127.5 - 1
    out = d.calc_bpd_loop(constant_model(x0), x0, generator=torch.Generator().manual_seed(0))
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (3, T)
    torch.testing.assert_close(
        out["vb"][:, :-1], torch.zeros(3, T - 1, dtype=F64), rtol=0, atol=1e-12
    )
    assert (out["vb"][:, -1] > 0).all()
    torch.testing.assert_close(
        out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"], rtol=1e-14, atol=0
    )
    torch.testing.assert_close(out["xstart_mse"], torch.zeros(3, T, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(out["mse"], torch.zeros(3, T, dtype=F64), rtol=0, atol=1e-16)


def test_float32_inputs_stay_float32():
    d = make("epsilon", "learned_range", "rescaled_mse")
    x0, eps, t = data()
    out = torch.cat([eps, torch.zeros_like(eps)], dim=1).float()
    losses = d.training_losses(constant_model(out), x0.float(), t, noise=eps.float())
    assert all(v.dtype == torch.float32 for v in losses.values())
    res = d.p_mean_variance(constant_model(out), x0.float(), t)
    assert all(v.dtype == torch.float32 for v in res.values())


def test_schedule_constants_cross_to_the_device_once_and_gather_exactly():
    from diffusion.process._tensor import device_table, extract_into_tensor

    arr = np.linspace(0.1, 0.9, 7)
    first = device_table(arr, torch.float32, torch.device("cpu"))
    assert device_table(arr, torch.float32, torch.device("cpu")) is first  # cached: no copy
    assert device_table(arr, torch.float64, torch.device("cpu")) is not first  # per dtype
    other = arr.copy()
    assert device_table(other, torch.float32, torch.device("cpu")) is not first  # per array
    t = torch.tensor([6, 0, 3])
    got = extract_into_tensor(arr, t, torch.zeros(3, 2, 2, dtype=torch.float64))
    assert got.shape == (3, 1, 1)
    torch.testing.assert_close(got.flatten(), torch.tensor(arr[[6, 0, 3]]), rtol=0, atol=0)
