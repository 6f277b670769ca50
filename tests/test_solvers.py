"""σ-space samplers (diffusion.sampling.sigmas / solvers) against closed forms.

Data x_0 ~ N(μ, s²) with the Bayes-optimal model (process.analytic.GaussianDataDenoiser) on
the LINEAR schedule, T = 1000 (σ from 0.0100 at t = 0 to 157.4 at t = 999). In VE
coordinates x̃ = x_t/√ᾱ the denoiser is D(x̃; σ) = μ + k(σ)(x̃ − μ), k = s²/(s² + σ²), so the
probability-flow ODE dx̃/dσ = (x̃ − D)/σ keeps (x̃ − μ)/√(s² + σ²) constant: from x̃_T at σ_max
it ends exactly at

    x0* = μ + (x̃_T − μ) s/√(s² + σ_max²)                          (at σ = 0)
    x0_min = μ + (x̃_T − μ) s²/(√(s² + σ_min²) √(s² + σ_max²))     (exact to σ_min, then D)

Every sampler here (and DDIM) ends with x_0 = D(x̃; σ_min), so x0_min is the limit of all of
them; it is 1.7e-4 RMS from x0* (the σ_min = 0.01 floor), below every error in the table.
Each step is affine in x̃ for this D, so the output moments of the stochastic samplers follow
scalar recurrences, written out here from k(σ) alone.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion import GaussianDiffusion, SpacedDiffusion, get_named_beta_schedule
from diffusion.process.analytic import GaussianDataDenoiser
from diffusion.sampling import (
    DDIMSampler,
    DPMSolverPP2MSampler,
    DPMSolverPP3MSampler,
    EulerAncestralSampler,
    HeunSampler,
    UniPCSampler,
    get_sampler,
)
from diffusion.sampling.sigmas import Denoiser, NoiseLevels
from diffusion.sampling.solvers import dpm_solver_pp_multistep

SAMPLER_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sampler"
T = 1000
MU, S = 0.2, 0.3
NUM = 4000  # samples of shape (1, 2, 2): 16000 iid values
NEW_PRESETS = {"dpmpp2m10": 10, "dpmpp2m20": 20, "dpmpp3m10": 10, "unipc10": 10, "unipc5": 5, "heun18": 35,
               "euler_a50": 50}  # -> NFE
F64 = torch.float64


def make_diffusion(mean_type="epsilon", var_type="fixed_small", rescale=False, num_timesteps=T):
    return GaussianDiffusion(
        betas=get_named_beta_schedule("linear", num_timesteps),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type="mse",
        rescale_timesteps=rescale,
    )


DIFFUSION = make_diffusion()
MODEL = GaussianDataDenoiser(DIFFUSION, MU, S)
ALPHAS_CUMPROD = np.cumprod(1.0 - get_named_beta_schedule("linear", T))  # independent of the code
SIGMAS = np.sqrt((1.0 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD)  # σ_t, eq. (1) of sigmas.py
SIGMA_MIN, SIGMA_MAX = SIGMAS[0], SIGMAS[-1]


def start_noise(seed=0, num=NUM):
    return torch.randn(num, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def exact_end_points(noise):
    """(x0*, x0_min) for the start x̃_T = x_T √(1 + σ_max²)."""
    x_T = noise * math.sqrt(1 + SIGMA_MAX**2)
    x0 = MU + (x_T - MU) * S / math.sqrt(S**2 + SIGMA_MAX**2)
    x0_min = MU + (x_T - MU) * S**2 / math.sqrt((S**2 + SIGMA_MIN**2) * (S**2 + SIGMA_MAX**2))
    return x0, x0_min


NOISE = start_noise()
EXACT, EXACT_MIN = exact_end_points(NOISE)
SMALL_NOISE = start_noise(1, 256)  # for error ratios, which do not depend on the samples
SMALL_EXACT_MIN = exact_end_points(SMALL_NOISE)[1]


def run(sampler, diffusion=DIFFUSION, model=MODEL, noise=NOISE, seed=1, clip=False):
    g = torch.Generator().manual_seed(seed)
    return sampler(diffusion, model, noise=noise, clip_denoised=clip, generator=g)


def rms(x, y) -> float:
    return float(((x - y) ** 2).mean().sqrt())


def assert_moments(x, mean, var, num_se=5.0, mean_slack=0.0, var_slack=0.0):
    values = x.flatten()
    n = values.numel()
    mean_tol = num_se * math.sqrt(var / n) + mean_slack
    var_tol = num_se * var * math.sqrt(2 / (n - 1)) + var_slack
    torch.testing.assert_close(values.mean().item(), mean, atol=mean_tol, rtol=0)
    torch.testing.assert_close(values.var().item(), var, atol=var_tol, rtol=0)


# --------------------------------------------------------------- noise levels, schedules
def test_noise_levels_and_fractional_timesteps():
    levels = NoiseLevels(DIFFUSION)
    np.testing.assert_allclose(levels.sigmas, SIGMAS, rtol=1e-12)
    assert levels.sigma_to_t(levels.sigma_max) == T - 1 and levels.sigma_to_t(levels.sigma_min) == 0
    for t in (0, 1, 17, 500, 998):
        assert abs(levels.sigma_to_t(float(SIGMAS[t])) - t) < 1e-9
    # halfway in log σ between two steps is t + 1/2; and t_to_sigma inverts sigma_to_t
    mid = math.sqrt(SIGMAS[41] * SIGMAS[42])
    assert abs(levels.sigma_to_t(mid) - 41.5) < 1e-9
    for t in (0.25, 41.5, 998.9):
        assert abs(levels.sigma_to_t(float(levels.t_to_sigma(t))) - t) < 1e-9
    with pytest.raises(ValueError, match="outside the process's range"):
        levels.sigma_to_t(200.0)


def test_step_schedules():
    """Every grid is N evaluated levels, descending, then 0. The σ grids space N + 1 levels
    from σ_max to σ_min and evaluate the first N (the step from the N-th goes to 0)."""
    def sig(schedule, n, **kw):
        return DPMSolverPP2MSampler(steps=n, schedule=schedule, **{"sigma_max": None, **kw}).sigmas(DIFFUSION)

    assert DPMSolverPP2MSampler(steps=5).sigmas(DIFFUSION)[0] == 80.0  # the default cap (EDM's σ_max)

    for schedule in ("logsnr", "karras", "linspace", "time_uniform", "leading", "trailing"):
        s = sig(schedule, 7)
        assert s.shape == (8,) and s[-1] == 0 and (np.diff(s) < 0).all(), schedule
    for schedule in ("logsnr", "karras"):
        np.testing.assert_allclose(sig(schedule, 7)[0], SIGMA_MAX, rtol=1e-12)
    # logsnr: λ uniform over [λ(σ_max), λ(σ_min)] in N = 6 steps, the 7th level (σ_min) not evaluated
    logsnr = np.log(sig("logsnr", 6)[:-1])
    np.testing.assert_allclose(logsnr, math.log(SIGMA_MAX) + np.arange(6) * math.log(SIGMA_MIN / SIGMA_MAX) / 6)
    # Karras eq. 5 on N + 1 = 3 levels: the middle one is evaluated second
    mid = ((SIGMA_MAX ** (1 / 7) + SIGMA_MIN ** (1 / 7)) / 2) ** 7
    np.testing.assert_allclose(sig("karras", 2)[:-1], [SIGMA_MAX, mid], rtol=1e-12)
    # sigma_max caps the start, sigma_min raises the far end (σ_{N}, not evaluated)
    capped = sig("logsnr", 4, sigma_max=10.0, sigma_min=0.1)
    np.testing.assert_allclose(capped, [10.0, 10.0 * 0.01**0.25, 1.0, 10.0 * 0.01**0.75, 0.0], rtol=1e-12)
    np.testing.assert_allclose(sig("logsnr", 3, sigma_max=1e6)[0], SIGMA_MAX)  # never beyond σ_{T−1}
    # time grids, by hand for T = 1000, N = 4 (Lin et al. 2023, Table 2)
    levels = NoiseLevels(DIFFUSION)
    times = {name: [levels.sigma_to_t(float(x)) for x in sig(name, 4)[:-1]]
             for name in ("leading", "trailing", "linspace")}
    np.testing.assert_allclose(times["leading"], [750, 500, 250, 0], atol=1e-9)
    np.testing.assert_allclose(times["trailing"], [999, 749, 499, 249], atol=1e-9)
    np.testing.assert_allclose(times["linspace"], [999, 666, 333, 0], atol=1e-9)
    np.testing.assert_allclose([levels.sigma_to_t(float(x)) for x in sig("linspace", 10)[:-1]],
                               np.arange(999, -1, -111), atol=1e-9)
    np.testing.assert_allclose(sig("trailing", 3)[:-1], SIGMAS[[999, 666, 332]], rtol=1e-12)  # round(1000 − i·333.3) − 1
    assert get_sampler("dpmpp2m10").sigmas(DIFFUSION).shape == (11,)
    np.testing.assert_allclose(sig("logsnr", 1), [SIGMA_MAX, 0.0], rtol=1e-12)
    # on the t grids the caps narrow [0, T − 1] to [t(σ_min), t(σ_max)]
    t_hi, t_lo = levels.sigma_to_t(10.0), levels.sigma_to_t(0.1)
    for name in ("leading", "trailing", "linspace"):
        capped_times = [levels.sigma_to_t(float(x)) for x in sig(name, 6, sigma_max=10.0, sigma_min=0.1)[:-1]]
        assert t_lo - 1e-9 <= min(capped_times) and max(capped_times) <= t_hi + 1e-9, name
    np.testing.assert_allclose(sig("linspace", 3, sigma_max=10.0, sigma_min=0.1)[:-1], [10.0, float(levels.t_to_sigma((t_hi + t_lo) / 2)), 0.1])
    with pytest.raises(ValueError, match="repeat a noise level"):
        sig("leading", 50, sigma_max=0.011)
    with pytest.raises(ValueError, match="sigma_max must be a positive noise level or null, got -1"):
        DPMSolverPP2MSampler(sigma_max=-1)
    with pytest.raises(ValueError, match="leave no range"):
        sig("logsnr", 3, sigma_max=0.5, sigma_min=2.0)


# ------------------------------------------------------- analytic model at fractional t
@pytest.mark.parametrize("rescale", [False, True])
def test_analytic_denoiser_is_unchanged_on_the_grid(rescale):
    d = make_diffusion(var_type="learned_range", rescale=rescale)
    model = GaussianDataDenoiser(d, MU, S)
    x = start_noise(3, 6)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    as_float = d.model_timesteps(t)  # float32 t·1000/T when rescaled, else the int64 t
    torch.testing.assert_close(model(x, t.double() if not rescale else as_float), model(x, t), rtol=0, atol=0)


def test_analytic_denoiser_at_fractional_t_uses_the_log_sigma_interpolation():
    d = make_diffusion(mean_type="v", var_type="learned_range", rescale=True)
    model = GaussianDataDenoiser(d, MU, S)
    x = start_noise(4, 5)
    t = np.array([0.3, 41.5, 250.25, 600.9, 998.5])
    log_sigma = np.interp(t, np.arange(T), np.log(SIGMAS))
    alpha_bar = 1.0 / (1.0 + np.exp(2 * log_sigma))  # ᾱ = 1/(1 + σ²)
    a = torch.tensor(np.sqrt(alpha_bar)).view(-1, 1, 1, 1)
    b = torch.tensor(np.sqrt(1 - alpha_bar)).view(-1, 1, 1, 1)
    x0 = MU + a * S**2 / (a**2 * S**2 + b**2) * (x - a * MU)  # E[x_0 | x_t]
    t_model = torch.tensor(t * 1000.0 / T)
    torch.testing.assert_close(model.posterior_mean_x0(x, t_model), x0, rtol=1e-12, atol=1e-12)
    eps = (x - a * x0) / b
    v_mean = model(x, t_model)[:, :1]  # (B, 2C, ...) -> the mean part
    torch.testing.assert_close(v_mean, a * eps - b * x0, rtol=1e-10, atol=1e-12)
    # a mixed batch: the grid entries stay exactly the table's
    mixed = torch.tensor([0.3, 41.0]) * 1000.0 / T
    grid = model.posterior_mean_x0(x[1:2], torch.tensor([41]))
    torch.testing.assert_close(model.posterior_mean_x0(x[:2], mixed)[1:], grid, rtol=0, atol=0)


def test_previous_x_models_are_refused_between_grid_steps():
    d = make_diffusion(mean_type="previous_x")
    with pytest.raises(ValueError, match="previous_x.*grid"):
        GaussianDataDenoiser(d, MU, S)(start_noise(0, 2), torch.tensor([3.5, 3.5], dtype=F64))
    for sampler in (get_sampler("dpmpp2m10"), get_sampler("heun18"), get_sampler("euler_a50")):
        with pytest.raises(ValueError, match="model_mean_type='previous_x' is not supported.*epsilon"):
            sampler.check(d)


# ------------------------------------------------------------------------- the denoiser
@pytest.mark.parametrize("mean_type", ["epsilon", "start_x", "v"])
@pytest.mark.parametrize("var_type,rescale", [("fixed_small", False), ("learned_range", True)])
def test_denoiser_on_the_grid_is_the_processes_pred_xstart(mean_type, var_type, rescale):
    """D(x̃; σ_t) with x̃ = x_t/√ᾱ_t equals p_mean_variance's clipped x̂_0 at step t."""
    d = make_diffusion(mean_type, var_type, rescale)
    model = GaussianDataDenoiser(d, 0.5, 0.8)  # wide data: some x̂_0 are clipped
    denoise = Denoiser(d, model, clip_denoised=True)
    clipped = 0
    for t in (0, 123, 999):
        x_t = 3 * start_noise(t, 64)
        expected = d.p_mean_variance(model, x_t, torch.full((64,), t))["pred_xstart"]
        got = denoise(x_t / math.sqrt(ALPHAS_CUMPROD[t]), float(SIGMAS[t]))
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
        clipped += int((expected.abs() == 1).sum())
    assert clipped > 0


def test_euler_without_noise_on_the_grid_is_ddim():
    """DDIM (η = 0) is Euler's method in σ in VE coordinates (x̃' = D + σ' (x̃ − D)/σ)."""
    ddim = DDIMSampler(steps=None, respacing="10")  # evenly spaced: 999, 888, ..., 0
    euler = EulerAncestralSampler(steps=10, schedule="time_uniform", eta=0.0)
    wide = GaussianDataDenoiser(DIFFUSION, 0.5, 0.8)
    for clip in (False, True):
        torch.testing.assert_close(
            run(euler, model=wide, noise=SMALL_NOISE, clip=clip),
            run(ddim, model=wide, noise=SMALL_NOISE, clip=clip),
            rtol=1e-9,
            atol=1e-10,
        )


# ------------------------------------------------------------ accuracy vs the exact ODE
# RMS error vs x0* (16000 values, seed 0), measured with the code in this commit (σ grids
# from σ_max = 157 to σ_min = 0.01, uncapped):
#
#   NFE | DDIM (η 0, evenly spaced) | DPM++(2M) logsnr | DPM++(3M) logsnr | UniPC-2 logsnr | UniPC-3 logsnr | Heun (Karras ρ 7, uncapped)
#   ----+---------------------------+------------------+------------------+----------------+----------------+------------------
#     5 | 2.052e-1                  | 6.50e-2          | 5.98e-2          | 5.74e-2        | 5.31e-2        |
#    10 | 1.203e-1                  | 2.60e-3          | 3.54e-2          | 1.12e-2        | 3.59e-2        | 1.86e-1 (N=5, 9 NFE)
#    20 | 6.27e-2                   | 3.37e-3          | 1.99e-3          | 2.14e-3        | 4.19e-4        | 6.25e-2 (N=10, 19 NFE)
#    35 | 3.64e-2                   |                  |                  |                |                | 1.80e-2 (heun18)
#
# DDIM is first order (the error halves per doubling). Every multistep solver is closer than
# DDIM at 5, 10 and 20 NFE; at 10 the third-order extrapolations (3M, UniPC-3) over steps of
# h ≈ 1 in λ lose to the second-order ones, at 20 they win. Heun (2N − 1 calls) is NOT better
# than DDIM at 9 and 19 calls: few levels spanning σ = 157 -> 0.01 make large step ratios,
# where its trapezoid in σ is poor, while DDIM, an exponential integrator, is exact where D
# is constant (σ ≫ s). Heun wins from ~35 NFE on (heun18, EDM's CIFAR-10 setting).
ERRORS = {  # (sampler, NFE): pinned RMS error vs x0*
    ("ddim", 5): 2.052e-1,
    ("ddim", 10): 1.203e-1,
    ("ddim", 20): 6.267e-2,
    ("ddim", 35): 3.636e-2,
    ("dpmpp2m", 5): 6.499e-2,
    ("dpmpp2m", 10): 2.596e-3,
    ("dpmpp2m", 20): 3.365e-3,
    ("dpmpp3m", 5): 5.982e-2,
    ("dpmpp3m", 10): 3.542e-2,
    ("dpmpp3m", 20): 1.992e-3,
    ("unipc2", 5): 5.739e-2,
    ("unipc2", 10): 1.116e-2,
    ("unipc2", 20): 2.139e-3,
    ("unipc3", 5): 5.311e-2,
    ("unipc3", 10): 3.587e-2,
    ("unipc3", 20): 4.189e-4,
    ("heun", 9): 1.857e-1,
    ("heun", 19): 6.251e-2,
    ("heun", 35): 1.796e-2,
}


UNCAPPED = {"schedule": "logsnr", "sigma_max": None}  # the table's grids: the process's whole range


def make(kind, nfe, **grid):
    grid = {**UNCAPPED, **({"schedule": "karras"} if kind == "heun" else {}), **grid}
    if kind == "ddim":
        return DDIMSampler(steps=None, respacing=str(nfe))
    if kind == "heun":
        return HeunSampler(steps=(nfe + 1) // 2, **grid)
    if kind.startswith("unipc"):
        return UniPCSampler(steps=nfe, order=int(kind[-1]), **grid)
    return {"dpmpp2m": DPMSolverPP2MSampler, "dpmpp3m": DPMSolverPP3MSampler}[kind](steps=nfe, **grid)


def test_errors_against_the_exact_probability_flow_solution():
    errors = {key: rms(run(make(*key)), EXACT) for key in ERRORS}
    for key, pinned in ERRORS.items():
        assert errors[key] == pytest.approx(pinned, rel=0.01), (key, errors[key])
    for kind in ("dpmpp2m", "dpmpp3m", "unipc2", "unipc3"):  # the multistep solvers beat DDIM
        assert errors[kind, 5] < errors["ddim", 5] / 3 and errors[kind, 10] < errors["ddim", 10] / 3, kind
    assert errors["heun", 35] < errors["ddim", 35] / 1.5  # EDM's 18 levels beat DDIM-35 (by 2x)
    assert 1.8 < errors["ddim", 10] / errors["ddim", 20] < 2.2  # DDIM: first order
    assert rms(EXACT_MIN, EXACT) < 2e-4


def grid_reference(sampler, noise):
    """The exact ODE from σ_max to the grid's last evaluated level σ_{N−1}, then x_0 = D there:
    what every solver's output tends to as its steps shrink (its last step is x_0 = D)."""
    sigmas = sampler.sigmas(DIFFUSION)
    start, last = sigmas[0], sigmas[-2]
    x_start = noise * math.sqrt(1 + start**2)
    x_last = MU + (x_start - MU) * math.sqrt(S**2 + last**2) / math.sqrt(S**2 + start**2)
    return MU + (x_last - MU) * k(last)


def doubling_ratios(kind, levels, **grid):
    errors = [rms(run(make(kind, n, **grid), noise=SMALL_NOISE), grid_reference(make(kind, n, **grid), SMALL_NOISE))
              for n in levels]
    return [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]


def test_heun_is_second_order():
    """Errors for N = 10, 20, 40 levels fall by 4.44 and 4.24 per doubling (Karras ρ = 7)."""
    ratios = doubling_ratios("heun", (19, 39, 79))
    assert all(3.5 < r < 5.5 for r in ratios), ratios


@pytest.mark.parametrize("kind,low,high", [
    ("dpmpp2m", 3.7, 4.3),   # order 2: 3.92, 3.98 (N = 40, 80, 160)
    ("unipc1", 3.7, 4.3),    # UniP-1 + UniC-1: order 2, 3.96, 3.99
    ("unipc2", 7.4, 8.6),    # UniP-2 + UniC-2: order 3, 7.85, 7.96
    ("unipc3", 10.0, 17.0),  # UniP-3 + UniC-3: order 4, 10.5, 13.7 (tending to 16)
])
def test_multistep_orders_by_step_doubling(kind, low, high):
    """Global errors against the same grid's exact end point, N = 40, 80, 160 logsnr levels:
    UniC raises UniP-p's order p to p + 1 (UniPC sec. 3.2, Theorem 3.1)."""
    ratios = doubling_ratios(kind, (40, 80, 160))
    assert all(low < r < high for r in ratios), ratios


def test_dpm_solver_pp_3m_is_third_order_per_step():
    """One 3M step from the exact trajectory's outputs at σ_0 e^{2h}, σ_0 e^h, σ_0 to σ_0 e^{−h}:
    the local error falls by at least 2⁴ per halving of h (third order; 2M's by 2³). Globally
    3M's first two steps are of order 1 and 2 (it has no history yet), so step doubling of the
    whole run shows order 2 here; the third-order gain shows at 20 NFE in the table above."""
    c = 1.7  # (x̃ − μ)/√(s² + σ²), constant along the exact ODE

    def exact(sigma):
        return torch.tensor([MU + c * math.sqrt(S**2 + sigma**2)], dtype=F64)

    def local_errors(order):
        errors = []
        for h in (0.2, 0.1, 0.05):
            levels = [0.5 * math.exp(j * h) for j in (2, 1, 0)]
            history = [(s, MU + k(s) * (exact(s) - MU)) for s in levels]
            step = dpm_solver_pp_multistep(exact(0.5), history, 0.5 * math.exp(-h), order)
            errors.append(float((step - exact(0.5 * math.exp(-h))).abs()))
        return [errors[i] / errors[i + 1] for i in range(2)]

    assert all(r > 15 for r in local_errors(3)), local_errors(3)
    assert all(7 < r < 8.5 for r in local_errors(2)), local_errors(2)


def test_unipc_predictor_of_order_2_is_dpm_solver_pp_2m():
    """UniP-2 with B(h) = e^{−h} − 1 and a = 1/2 is DPM-Solver++(2M) term by term (UniPC sec. 3.3)."""
    for schedule in ("logsnr", "karras"):
        torch.testing.assert_close(
            run(UniPCSampler(steps=10, schedule=schedule, corrector=False), noise=SMALL_NOISE),
            run(DPMSolverPP2MSampler(steps=10, schedule=schedule), noise=SMALL_NOISE), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ sample distributions
EXACT_MEAN = MU * (1 - S / math.sqrt(S**2 + SIGMA_MAX**2))  # moments of x0* for x_T ~ N(0, 1)
EXACT_VAR = (1 + SIGMA_MAX**2) * S**2 / (S**2 + SIGMA_MAX**2)


@pytest.mark.parametrize("name,pinned", [("dpmpp2m10", 5.114e-3), ("dpmpp2m20", 8.979e-3), ("unipc10", 3.771e-3),
                                         ("heun18", 1.359e-2)])
def test_deterministic_samples_have_the_data_moments(name, pinned):
    """Within 5 SE of the exact map's moments, plus what the measured RMS error e from x0*
    can move them: |Δmean| ≤ e, |Δvar| ≤ 2 s e + e² (std(x) ≤ std(x0*) + std(x − x0*))."""
    x = run(get_sampler(name))
    error = rms(x, EXACT)
    assert error < 1.01 * pinned  # the allowance is small: 2.5% (unipc10) .. 9.3% (heun18) of s²
    assert abs(EXACT_VAR / S**2 - 1) < 1e-4 and abs(EXACT_MEAN - MU) < 1e-3  # x0* ≈ the data
    assert_moments(EXACT, MU, S**2)
    assert_moments(x, EXACT_MEAN, EXACT_VAR, mean_slack=error, var_slack=2 * S * error + error**2)


def k(sigma):  # D − μ = k(σ)(x̃ − μ)
    return S**2 / (S**2 + sigma**2)


def chain_moments(sigmas, step):
    """Mean and variance of x_0 when x̃ − μ starts at −μ + N(0, 1 + σ_max²) and each step
    maps y = x̃ − μ to gain·(y + √pre z) + √post z'; ``step(σ, σ')`` -> (gain, pre, post)."""
    mean, var = -MU, 1 + sigmas[0] ** 2
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        gain, pre, post = step(float(sigma), float(sigma_next))
        mean, var = gain * mean, gain**2 * (var + pre) + post
    return MU + mean, var


def euler_ancestral_step(sigma, sigma_next):
    """η = 1: Euler to σ_d = σ'²/σ, then noise σ_u² = σ'² − σ_d²."""
    sigma_down = sigma_next**2 / sigma
    return 1 + (sigma_down - sigma) * (1 - k(sigma)) / sigma, 0.0, sigma_next**2 - sigma_down**2


def heun_churn_step(sampler):
    def step(sigma, sigma_next):
        gamma = min(sampler.s_churn / sampler.steps, math.sqrt(2) - 1)
        hat = min(sigma * (1 + gamma), SIGMA_MAX) if sampler.s_tmin <= sigma <= sampler.s_tmax else sigma
        gain = 1 + (sigma_next - hat) * (1 - k(hat)) / hat  # Euler
        if sigma_next > 0:  # trapezoid: the slope at σ' is taken at the Euler point
            slope_next = (1 - k(sigma_next)) / sigma_next * gain
            gain = 1 + (sigma_next - hat) / 2 * ((1 - k(hat)) / hat + slope_next)
        return gain, (hat**2 - sigma**2) * sampler.s_noise**2, 0.0

    return step


def test_euler_ancestral_follows_its_closed_form_chain():
    """50 levels: η = 1 takes the posterior's noise but not Var[x_0|x̃], so the variance is
    ~30% short (as DDPM with fixed_small variances on 50 steps); the chain predicts it."""
    sampler = get_sampler("euler_a50")
    mean, var = chain_moments(sampler.sigmas(DIFFUSION), euler_ancestral_step)
    assert var / S**2 < 0.8  # the test has power: far from the data variance
    assert_moments(run(sampler, noise=start_noise(8), seed=9), mean, var)


def test_euler_ancestral_chain_reaches_the_data_with_enough_steps():
    """The sampler follows its chain (above); the chain's variance shortfall shrinks as
    O(1/N): 29%, 10%, 2.5% of s² for 50, 200, 1000 time-uniform levels (logsnr: 17%, 4.8%,
    1.1%), and its mean is μ to 1e-6; so at N = T the samples match the data within MC error
    (5 SE of the variance is 5.6% with 16000 values)."""
    shortfalls = []
    for n in (50, 200, 1000):
        sigmas = EulerAncestralSampler(steps=n, schedule="time_uniform").sigmas(DIFFUSION)
        mean, var = chain_moments(sigmas, euler_ancestral_step)
        assert abs(mean - MU) < 1e-6
        shortfalls.append(1 - var / S**2)
    assert shortfalls == pytest.approx([0.2926, 0.1027, 0.0248], abs=1e-3)


def test_heun_with_churn_follows_its_closed_form_chain():
    sampler = HeunSampler(steps=18, s_churn=10.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    mean, var = chain_moments(sampler.sigmas(DIFFUSION), heun_churn_step(sampler))
    x = run(sampler, noise=start_noise(12), seed=13)
    assert_moments(x, mean, var)
    deterministic = chain_moments(sampler.sigmas(DIFFUSION), heun_churn_step(HeunSampler(steps=18)))
    assert abs(deterministic[1] - var) > 10 * var * math.sqrt(2 / x.numel())  # churn is seen


# ------------------------------------------------------------------ parameterisations
@pytest.mark.parametrize("name", ["dpmpp2m10", "heun18", "euler_a50"])
def test_every_parameterisation_gives_the_same_samples(name):
    sampler = get_sampler(name)
    if name == "heun18":
        sampler = HeunSampler(steps=18, s_churn=5.0)
    reference = None
    for mean_type, var_type in [("epsilon", "fixed_small"), ("start_x", "fixed_large"),
                                ("v", "fixed_small"), ("epsilon", "learned_range"), ("v", "learned")]:
        d = make_diffusion(mean_type, var_type, rescale=var_type == "learned_range")
        x = run(sampler, diffusion=d, model=GaussianDataDenoiser(d, MU, S), noise=start_noise(5, 256))
        if reference is not None:
            torch.testing.assert_close(x, reference, rtol=0, atol=1e-10)
        reference = x


# ----------------------------------------------------------- plumbing and checks
@pytest.mark.parametrize("name", sorted(NEW_PRESETS))
def test_num_function_evals_counts_the_model_calls(name):
    calls = []

    def model(x, t, **kwargs):
        calls.append(t)
        return MODEL(x, t)

    sampler = get_sampler(name)
    assert sampler.num_function_evals(T) == NEW_PRESETS[name]
    assert get_sampler(name).num_function_evals(4000) == NEW_PRESETS[name]
    run(sampler, model=model, noise=start_noise(0, 2))
    assert len(calls) == NEW_PRESETS[name]
    called = sorted({float(t[0]) for t in calls})
    assert called == pytest.approx(sampler.timesteps(DIFFUSION), abs=1e-9)
    top = min(float(sampler.sigma_max or math.inf), SIGMA_MAX)  # the grid's σ_max
    assert called[-1] == pytest.approx(NoiseLevels(DIFFUSION).sigma_to_t(top), abs=1e-9)
    first_level = float(sampler.sigmas(DIFFUSION)[-2])  # the last call: above σ_0 on the σ grids
    assert called[0] == pytest.approx(NoiseLevels(DIFFUSION).sigma_to_t(first_level), abs=1e-9)
    assert all(t.dtype == F64 and t.shape == (2,) for t in calls)


def test_heun_steps_override_and_churned_timesteps():
    assert HeunSampler(steps=5).num_function_evals(T) == 9
    assert HeunSampler(steps=1).num_function_evals(T) == 1
    churned = HeunSampler(steps=10, s_churn=5.0, sigma_max=None).timesteps(DIFFUSION)
    assert len(churned) == 2 * 10 - 1 and churned[-1] == T - 1  # σ̂_0 is capped at σ_max
    assert EulerAncestralSampler(steps=4, schedule="time_uniform").timesteps(T) == [0.0, 333.0, 666.0, 999.0]
    with pytest.raises(ValueError, match="timesteps\\(diffusion\\)"):
        get_sampler("dpmpp2m10").timesteps(T)


def test_rescaled_timesteps_reach_the_model_as_the_process_scales_them():
    plain, rescaled = make_diffusion(num_timesteps=250), make_diffusion(rescale=True, num_timesteps=250)
    seen = []

    def model(x, t, **kwargs):
        seen.append(float(t[0]))
        return GaussianDataDenoiser(rescaled, MU, S)(x, t)

    sampler = DPMSolverPP2MSampler(steps=10, sigma_max=None)  # from t = T − 1
    x = run(sampler, diffusion=rescaled, model=model, noise=start_noise(0, 64))
    expected = run(sampler, diffusion=plain, model=GaussianDataDenoiser(plain, MU, S), noise=start_noise(0, 64))
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-12)
    assert sorted(seen) == pytest.approx([4.0 * t for t in sampler.timesteps(plain)], rel=1e-12)
    assert max(seen) == 996.0  # t·1000/T at t = T − 1


@pytest.mark.parametrize("name", ["heun18", "euler_a50", "dpmpp2m10"])
def test_same_seed_same_samples(name):
    sampler = HeunSampler(s_churn=10.0) if name == "heun18" else get_sampler(name)

    def draw(seed):
        return sampler(DIFFUSION, MODEL, shape=(8, 1, 2, 2), generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(draw(0), draw(0), rtol=0, atol=0)
    assert not torch.equal(draw(0), draw(1))
    # the start is x_T ~ N(0, I), the generator's first draw, as for DDIM
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 1, 2, 2, generator=g)
    torch.testing.assert_close(sampler(DIFFUSION, MODEL, noise=noise, generator=g), draw(0), rtol=0, atol=0)


def test_a_closure_model_with_class_labels():
    calls = []

    def model(x, t, **kwargs):
        calls.append(kwargs)
        return MODEL(x, t)

    g = torch.Generator().manual_seed(0)
    x = get_sampler("dpmpp2m10")(DIFFUSION, model, shape=(3, 1, 2, 2), model_kwargs={"y": 1}, generator=g)
    assert x.shape == (3, 1, 2, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert calls == [{"y": 1}] * 10


def test_checks():
    get_sampler("heun18").check(DIFFUSION)
    with pytest.raises(ValueError, match="sampler asks for 2000 steps but the process has only 1000"):
        DPMSolverPP2MSampler(steps=2000).check(DIFFUSION)
    with pytest.raises(ValueError, match="sampler asks for 1001 steps"):
        run(EulerAncestralSampler(steps=1001))
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; valid: leading, trailing, linspace, time_uniform, logsnr, karras"):
        DPMSolverPP2MSampler(schedule="cosine")
    with pytest.raises(ValueError, match="unknown schedule"):
        HeunSampler(schedule="edm")
    with pytest.raises(ValueError, match="steps must be"):
        HeunSampler(steps=0)
    with pytest.raises(ValueError, match="rho must be positive"):
        DPMSolverPP2MSampler(rho=0)
    with pytest.raises(ValueError, match="s_churn and s_noise must be >= 0"):
        HeunSampler(s_churn=-1)
    with pytest.raises(ValueError, match="eta must be in \\[0, 1\\]"):
        EulerAncestralSampler(eta=2)
    spaced = SpacedDiffusion(range(0, T, 2), betas=DIFFUSION.betas, model_mean_type="epsilon",
                             model_var_type="fixed_small", loss_type="mse")
    with pytest.raises(ValueError, match="base process"):
        get_sampler("dpmpp2m10").check(spaced)


def test_zero_terminal_snr_is_refused():
    betas = get_named_beta_schedule("linear", 100)
    betas[-1] = 1.0  # ᾱ_(T-1) = 0: σ = ∞
    d = GaussianDiffusion(betas=betas, model_mean_type="v", model_var_type="fixed_small", loss_type="mse")
    with pytest.raises(ValueError, match="zero terminal SNR.*DDIM or DDPM"):
        get_sampler("dpmpp2m10").check(d)


def test_a_bad_model_output_shape_is_named():
    d = make_diffusion(var_type="learned_range")
    with pytest.raises(ValueError, match="model output has shape \\(2, 1, 2, 2\\), expected \\(2, 2, 2, 2\\)"):
        run(get_sampler("dpmpp2m10"), diffusion=d, noise=start_noise(0, 2))


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", sorted(NEW_PRESETS))
def test_config_instantiates_the_preset(name):
    cfg = OmegaConf.load(SAMPLER_CONFIGS / f"{name}.yaml")
    sampler = instantiate(cfg)
    assert sampler == get_sampler(name)
    assert set(cfg) - {"_target_"} == set(inspect.signature(type(sampler)).parameters)


def test_sample_config_overrides(compose_cfg):
    cfg = compose_cfg("sample", ["sampler=dpmpp2m20", "sampler.schedule=karras", "ckpt=unused"])
    assert instantiate(cfg.sampler) == DPMSolverPP2MSampler(steps=20, schedule="karras")
    cfg = compose_cfg("sample", ["sampler=heun18", "sampler.steps=40", "sampler.s_churn=40", "ckpt=unused"])
    sampler = instantiate(cfg.sampler)
    assert sampler == HeunSampler(steps=40, s_churn=40.0) and sampler.s_tmax == math.inf


def test_sampler_pickles():
    import pickle

    sampler = HeunSampler(s_churn=3.0)
    run(sampler, noise=start_noise(0, 2))
    assert pickle.loads(pickle.dumps(sampler)) == sampler


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["dpmpp2m10", "euler_a50"])
def test_sampling_on_cuda_with_a_cuda_generator(name):
    def draw():
        g = torch.Generator(device="cuda").manual_seed(0)
        return get_sampler(name)(DIFFUSION, MODEL.cuda(), shape=(64, 1, 2, 2), generator=g)

    x = draw()
    assert x.device.type == "cuda" and torch.isfinite(x).all()
    torch.testing.assert_close(x, draw(), rtol=0, atol=0)
