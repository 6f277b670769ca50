"""Samplers (diffusion.sampling): step rules, presets, configs, and the distribution of samples.

The distribution tests use the Bayes-optimal model for Gaussian data x_0 ~ N(μ, s²)
(process.analytic.GaussianDataDenoiser). Every sampler is then a linear-Gaussian chain, so
the mean and variance of its output have a closed form, computed here in numpy from ᾱ alone
(independently of the process code). DDIM with η = 0 and DDPM with fixed variances are
biased on such data at any finite step count (e.g. ddim50 gives about 0.85 s² at T=100), so
samples are compared with their own sampler's closed form; DDPM over all steps with the
optimal (learned) variance reproduces the data itself and is compared with μ, s² directly.
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

from diffusion import GaussianDiffusion, SpacedDiffusion, get_named_beta_schedule, space_timesteps
from diffusion.process.analytic import GaussianDataDenoiser
from diffusion.sampling import SAMPLERS, DDIMSampler, DDPMSampler, get_sampler
from diffusion.sampling import steps as sampling_steps

SAMPLER_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sampler"
T = 100
MU, STD = 0.2, 0.3
NUM_SAMPLES = 4000  # of shape (1, 2, 2): 16000 iid values


def make_diffusion(model_var_type="fixed_small", num_timesteps=T, rescale_timesteps=False):
    return GaussianDiffusion(
        betas=get_named_beta_schedule("linear", num_timesteps),
        model_mean_type="epsilon",
        model_var_type=model_var_type,
        loss_type="mse",
        rescale_timesteps=rescale_timesteps,
    )


# ------------------------------------------------------------------ closed-form moments
def chain_moments(alphas_cumprod, kept, kind, mu=MU, s=STD, eta=0.0, variance="fixed_small"):
    """Mean and variance of the output of a sampler over the ``kept`` steps, started from
    x_T ~ N(0, 1), with the optimal denoiser for N(mu, s²) data (all steps are affine).

    kind "ddim": x' = √ᾱ' x̂_0 + √(1 − ᾱ' − σ²) ε̂ + σ z (DDIM eqs. 12, 16).
    kind "ddpm": x' = c1 x̂_0 + c2 x + √Σ z with the respaced β' = 1 − ᾱ/ᾱ' (DDPM eq. 7).
    """
    kept = sorted(kept)
    mean, var = 0.0, 1.0
    for j in reversed(range(len(kept))):
        ab = alphas_cumprod[kept[j]]
        ab_prev = alphas_cumprod[kept[j - 1]] if j > 0 else 1.0
        a, b = math.sqrt(ab), math.sqrt(1 - ab)
        gain = a * s * s / (ab * s * s + b * b)  # x̂_0 = gain·x + offset (E[x_0 | x_t])
        x0_gain, x0_off = gain, mu * (1 - gain * a)
        eps_gain, eps_off = (1 - a * x0_gain) / b, -a * x0_off / b  # ε̂ = (x − a x̂_0)/b
        beta = 1 - ab / ab_prev
        if kind == "ddim":
            sigma2 = eta**2 * (1 - ab_prev) / (1 - ab) * beta
            c = math.sqrt(max(1 - ab_prev - sigma2, 0.0))
            step_gain = math.sqrt(ab_prev) * x0_gain + c * eps_gain
            step_off = math.sqrt(ab_prev) * x0_off + c * eps_off
        else:
            c1 = math.sqrt(ab_prev) * beta / (1 - ab)
            c2 = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
            step_gain, step_off = c1 * x0_gain + c2, c1 * x0_off
            sigma2 = {
                "fixed_small": beta * (1 - ab_prev) / (1 - ab),
                # optimal: β̃ + c1² Var[x_0 | x_t] (exact reverse step of Gaussian data)
                "learned": beta * (1 - ab_prev) / (1 - ab)
                + c1**2 * s * s * b * b / (ab * s * s + b * b),
            }[variance]
        mean = step_gain * mean + step_off
        var = step_gain**2 * var + (sigma2 if j > 0 else 0.0)  # no noise on the last step
    return mean, var


def assert_moments(x, mean, var, num_se=5.0):
    """Sample mean and variance within ``num_se`` standard errors of (mean, var)."""
    values = x.flatten().double()
    n = values.numel()
    torch.testing.assert_close(values.mean().item(), mean, atol=num_se * math.sqrt(var / n), rtol=0)
    torch.testing.assert_close(
        values.var().item(), var, atol=num_se * var * math.sqrt(2 / (n - 1)), rtol=0
    )


def draw(sampler, diffusion, seed=0, num_samples=NUM_SAMPLES):
    model = GaussianDataDenoiser(diffusion, MU, STD)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_samples, 1, 2, 2, generator=generator, dtype=torch.float64)
    return sampler(diffusion, model, noise=noise, clip_denoised=False, generator=generator)


CASES = {
    "ddpm": (lambda: get_sampler("ddpm"), "ddpm", 0.0),
    "ddpm_sections": (lambda: DDPMSampler(respacing="10,15,20"), "ddpm", 0.0),
    "ddim50": (lambda: get_sampler("ddim50"), "ddim", 0.0),
    "ddim_quadratic": (lambda: DDIMSampler(steps=8, skip="quadratic"), "ddim", 0.0),
    "ddim_sections": (lambda: DDIMSampler(steps=None, respacing="10,15,20"), "ddim", 0.0),
    "ddim50_eta1": (lambda: get_sampler("ddim50_eta1"), "ddim", 1.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sample_moments_match_closed_form(case):
    make_sampler, kind, eta = CASES[case]
    sampler = make_sampler()
    diffusion = make_diffusion("fixed_small")
    x = draw(sampler, diffusion, seed=1)
    mean, var = chain_moments(diffusion.alphas_cumprod, sampler.timesteps(T), kind, eta=eta)
    assert x.shape == (NUM_SAMPLES, 1, 2, 2) and x.dtype == torch.float64
    assert_moments(x, mean, var)


def test_ddpm_with_optimal_variance_reproduces_the_data():
    """All T steps with the exact reverse variance: the output is N(μ, s²) up to the last
    step's x̂_0 = E[x_0|x_1] (which removes Var[x_0|x_1] ≈ β_1 s², 1% here)."""
    diffusion = make_diffusion("learned")
    x = draw(get_sampler("ddpm"), diffusion, seed=2)
    mean, var = chain_moments(diffusion.alphas_cumprod, range(T), "ddpm", variance="learned")
    assert abs(var / STD**2 - 1) < 0.02 and abs(mean - MU) < 1e-5  # x_T is not exactly N(0, 1)
    assert_moments(x, mean, var)
    assert_moments(x, MU, STD**2)


def test_closed_form_chain_detects_a_wrong_variance():
    """The moment test has power: DDIM η=0 and η=1 differ by far more than 5 SE here."""
    ab = make_diffusion().alphas_cumprod
    kept = get_sampler("ddim50").timesteps(T)
    _, var0 = chain_moments(ab, kept, "ddim", eta=0.0)
    _, var1 = chain_moments(ab, kept, "ddim", eta=1.0)
    se = var0 * math.sqrt(2 / (NUM_SAMPLES * 4))
    assert abs(var0 - var1) > 10 * se


def test_rescaled_timesteps_give_the_same_samples():
    sampler = DDIMSampler(steps=20, eta=1.0)
    x_plain = draw(sampler, make_diffusion(), seed=3, num_samples=64)
    x_rescaled = draw(sampler, make_diffusion(rescale_timesteps=True), seed=3, num_samples=64)
    torch.testing.assert_close(x_plain, x_rescaled, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", ["ddpm100", "ddim20", "ddim50_eta1"])
def test_same_seed_same_samples(name):
    diffusion = make_diffusion()
    model = GaussianDataDenoiser(diffusion, MU, STD)
    sampler = get_sampler(name)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return sampler(diffusion, model, shape=(8, 1, 2, 2), generator=g)

    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert not torch.equal(run(0), run(1))


def test_respaced_process_is_built_once_per_base_process():
    diffusion = make_diffusion()
    sampler = get_sampler("ddim10")
    spaced = sampler.respaced(diffusion)
    assert isinstance(spaced, SpacedDiffusion) and spaced is sampler.respaced(diffusion)
    assert spaced.timestep_map.tolist() == list(range(0, T, T // 10))
    np.testing.assert_allclose(
        spaced.alphas_cumprod, diffusion.alphas_cumprod[:: T // 10], rtol=1e-12
    )
    other = make_diffusion()
    assert sampler.respaced(other) is not spaced
    assert get_sampler("ddpm").respaced(diffusion) is diffusion  # all steps: no respacing


def test_a_closure_model_samples_on_the_generators_device():
    """sample.py wraps the network in a closure (autocast): no parameters to look at."""
    diffusion = make_diffusion()
    inner = GaussianDataDenoiser(diffusion, MU, STD)
    calls = []

    def model(x, t, **kwargs):
        calls.append(kwargs)
        return inner(x, t)

    g = torch.Generator().manual_seed(0)
    x = get_sampler("ddim10")(diffusion, model, shape=(3, 1, 2, 2), model_kwargs={"y": 1}, generator=g)
    assert x.shape == (3, 1, 2, 2) and x.dtype == torch.float32 and x.device == g.device
    assert calls == [{"y": 1}] * 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_on_cuda_with_a_cuda_generator():
    diffusion = make_diffusion()
    model = GaussianDataDenoiser(diffusion, MU, STD)

    def run():
        g = torch.Generator(device="cuda").manual_seed(0)
        return get_sampler("ddim50_eta1")(diffusion, model, shape=(64, 1, 2, 2), generator=g)

    x = run()
    assert x.device.type == "cuda" and torch.isfinite(x).all()
    torch.testing.assert_close(x, run(), rtol=0, atol=0)


def test_check_fails_before_sampling():
    diffusion = make_diffusion()
    get_sampler("ddim50").check(diffusion)
    with pytest.raises(ValueError, match="sampler asks for 250 steps but the process has only 100"):
        get_sampler("ddim250").check(diffusion)


def test_shape_and_noise_are_exclusive():
    diffusion = make_diffusion()
    model = GaussianDataDenoiser(diffusion, MU, STD)
    with pytest.raises(ValueError, match="exactly one of shape and noise"):
        get_sampler("ddim10")(diffusion, model)
    with pytest.raises(ValueError, match="exactly one of shape and noise"):
        get_sampler("ddim10")(diffusion, model, shape=(2, 1, 2, 2), noise=torch.zeros(2, 1, 2, 2))


def test_respaced_process_is_refused():
    base = make_diffusion()
    spaced = SpacedDiffusion(
        range(0, T, 2),
        betas=base.betas,
        model_mean_type="epsilon",
        model_var_type="fixed_small",
        loss_type="mse",
    )
    model = GaussianDataDenoiser(base, MU, STD)
    with pytest.raises(ValueError, match="base process"):
        get_sampler("ddim10")(spaced, model, shape=(2, 1, 2, 2))


# ------------------------------------------------------------------------ step rules
def test_uniform_skip_is_the_ddim_stride():
    assert DDIMSampler(steps=50).timesteps(1000) == list(range(0, 1000, 20))  # DDIM: T // N
    assert DDIMSampler(steps=10).timesteps(4000)[:3] == [0, 400, 800]
    # N does not divide T: stride ceil(T/N) keeps exactly N (DDIM's T // N = 33 keeps 31)
    assert DDIMSampler(steps=30).timesteps(1000) == list(range(0, 1000, 34))
    assert len(range(0, 1000, 1000 // 30)) == 31
    assert DDIMSampler(steps=1).timesteps(1000) == [0]
    assert DDIMSampler(steps=None).timesteps(7) == list(range(7))


@pytest.mark.parametrize("num_timesteps", [10, 100, 200, 1000, 4000])
def test_uniform_skip_equals_improved_diffusion_ddimN(num_timesteps):
    checked = 0
    for n in range(1, min(num_timesteps, 120) + 1):
        try:
            expected = sorted(space_timesteps(num_timesteps, f"ddim{n}"))
        except ValueError:
            with pytest.raises(ValueError, match="uniform skip"):
                sampling_steps.uniform_skip_timesteps(num_timesteps, n)
            continue
        assert sampling_steps.uniform_skip_timesteps(num_timesteps, n) == expected
        checked += 1
    assert checked >= 5


def test_uniform_skip_without_an_exact_stride_is_an_error():
    with pytest.raises(ValueError, match="no integer stride keeps exactly 60 of 100"):
        DDIMSampler(steps=60).timesteps(100)


def test_quadratic_skip_values():
    # τ_i = floor(800 i² / 81) for T = 1000, N = 10 (c = 0.8 T / (N-1)²), by hand:
    # 0, 9.88, 39.5, 88.9, 158.02, 246.9, 355.6, 483.95, 632.1, 800
    assert DDIMSampler(steps=10, skip="quadratic").timesteps(1000) == [
        0,
        9,
        39,
        88,
        158,
        246,
        355,
        483,
        632,
        800,
    ]
    # T = 200, N = 10: floor(160 i² / 81): 0, 1.98, 7.9, 17.8, 31.6, 49.4, 71.1, 96.8, 126.4, 160
    assert DDIMSampler(steps=10, skip="quadratic").timesteps(200) == [
        0,
        1,
        7,
        17,
        31,
        49,
        71,
        96,
        126,
        160,
    ]


def test_quadratic_skip_with_repeated_steps_is_an_error():
    with pytest.raises(ValueError, match="quadratic skip: 50 steps out of 100 repeat step 0"):
        DDIMSampler(steps=50, skip="quadratic").timesteps(100)


def test_ddpm_evenly_spaced_and_section_counts():
    # IDDPM sec. 4: N evenly spaced reals in [0, T-1], rounded: stride 99/9 = 11
    assert DDPMSampler(steps=10).timesteps(100) == list(range(0, 100, 11))
    assert DDPMSampler().timesteps(5) == [0, 1, 2, 3, 4]
    kept = DDPMSampler(respacing="10,15,20").timesteps(300)
    assert len(kept) == 45 and kept[:2] == [0, 11] and kept[9:11] == [99, 100]
    assert kept[24:26] == [199, 200] and kept[-1] == 299
    assert DDIMSampler(steps=None, respacing=[10, 15, 20]).timesteps(300) == kept
    assert DDPMSampler(respacing=45).timesteps(300) == sorted(space_timesteps(300, [45]))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_num_function_evals(name):
    expected = {
        "ddpm": 4000,
        "ddpm250": 250,
        "ddpm100": 100,
        "ddim10": 10,
        "ddim20": 20,
        "ddim50": 50,
        "ddim100": 100,
        "ddim250": 250,
        "ddim50_eta1": 50,
        "dpmpp2m10": 10,
        "dpmpp2m20": 20,
        "dpmpp3m10": 10,
        "unipc10": 10,
        "unipc5": 5,
        "heun18": 35,  # 2 evaluations a step, Euler on the last (EDM Algorithm 1)
        "euler_a50": 50,
    }
    assert get_sampler(name).num_function_evals(4000) == expected[name]


# ------------------------------------------------------------------------------ errors
def test_more_steps_than_the_process_has():
    message = "sampler asks for 250 steps but the process has only 100"
    for sampler in (
        get_sampler("ddim250"),
        get_sampler("ddpm250"),
        DDIMSampler(steps=250, skip="quadratic"),
    ):
        with pytest.raises(ValueError, match=message):
            sampler.timesteps(T)
    diffusion = make_diffusion()
    with pytest.raises(ValueError, match=message):
        get_sampler("ddim250")(
            diffusion, GaussianDataDenoiser(diffusion, MU, STD), shape=(1, 1, 2, 2)
        )


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_step_counts(steps):
    with pytest.raises(ValueError, match="steps must be"):
        DDIMSampler(steps=steps)
    with pytest.raises(ValueError, match="steps must be"):
        DDPMSampler(steps=steps)


def test_unknown_sampler_name_lists_the_presets():
    with pytest.raises(ValueError, match="unknown sampler 'ddim51'.*ddim50.*ddim50_eta1"):
        get_sampler("ddim51")


def test_unknown_skip_lists_the_rules():
    with pytest.raises(ValueError, match="unknown skip 'linear'; valid: uniform, quadratic, trailing, linspace"):
        DDIMSampler(skip="linear")


def test_trailing_and_linspace_skips():
    """Lin et al. 2023, Table 2, for T = 1000: trailing round(1000 − i·1000/N) − 1; linspace is
    improved-diffusion's evenly spaced respacing "N"; uniform is DDIM's leading range(0, T, T/N)."""
    assert DDIMSampler(steps=5, skip="trailing").timesteps(1000) == [199, 399, 599, 799, 999]
    assert DDIMSampler(steps=3, skip="trailing").timesteps(1000) == [332, 666, 999]
    assert DDIMSampler(steps=5, skip="uniform").timesteps(1000) == [0, 200, 400, 600, 800]
    for n in (5, 7, 10):
        assert DDIMSampler(steps=n, skip="linspace").timesteps(1000) == DDIMSampler(
            steps=None, respacing=str(n)).timesteps(1000)
        assert len(DDIMSampler(steps=n, skip="trailing").timesteps(1000)) == n
    # DDIM on the trailing grid is deterministic Euler in σ on the same grid (η = 0)
    diffusion = make_diffusion()
    model = GaussianDataDenoiser(diffusion, MU, STD)
    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    from diffusion.sampling import EulerAncestralSampler

    torch.testing.assert_close(
        DDIMSampler(steps=10, skip="trailing")(diffusion, model, noise=noise, clip_denoised=False),
        EulerAncestralSampler(steps=10, schedule="trailing", eta=0.0)(diffusion, model, noise=noise, clip_denoised=False),
        rtol=1e-9, atol=1e-10)


def test_steps_and_respacing_are_alternatives():
    with pytest.raises(ValueError, match="steps=10 and respacing='10,15,20'"):
        DDPMSampler(steps=10, respacing="10,15,20")
    with pytest.raises(ValueError, match="steps=50 and respacing='10,15,20'.*steps=None"):
        DDIMSampler(respacing="10,15,20")
    with pytest.raises(ValueError, match="skip='quadratic' without steps"):
        DDIMSampler(steps=None, skip="quadratic", respacing="10,15,20")
    with pytest.raises(ValueError, match="skip='quadratic' without steps"):
        DDIMSampler(steps=None, skip="quadratic")


@pytest.mark.parametrize("respacing", ["", "10,x", "0,5", [3, -1], 1.5])
def test_bad_respacing(respacing):
    with pytest.raises(ValueError, match="respacing must be section counts"):
        DDPMSampler(respacing=respacing)


def test_bad_eta():
    with pytest.raises(ValueError, match="eta must be in \\[0, 1\\]"):
        DDIMSampler(eta=1.5)


# ----------------------------------------------------------------------------- configs
def test_every_preset_has_a_config_and_back():
    # sampler=student is no preset: it reads a distilled checkpoint's own sampler (jobs/sample.py)
    assert sorted(p.stem for p in SAMPLER_CONFIGS.glob("*.yaml")) == sorted([*SAMPLERS, "student"])
    assert OmegaConf.load(SAMPLER_CONFIGS / "student.yaml") == {"from_checkpoint": True, "steps": None}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_config_instantiates_the_preset(name):
    cfg = OmegaConf.load(SAMPLER_CONFIGS / f"{name}.yaml")
    sampler = instantiate(cfg)
    assert sampler == get_sampler(name)
    params = inspect.signature(type(sampler)).parameters
    assert set(cfg) - {"_target_"} == set(params)  # keys are exactly the constructor's


def test_sample_config_overrides(compose_cfg):
    cfg = compose_cfg(
        "sample",
        [
            "sampler=ddim50",
            "sampler.steps=37",
            "sampler.eta=0.5",
            "sampler.skip=quadratic",
            "ckpt=unused",
        ],
    )
    assert instantiate(cfg.sampler) == DDIMSampler(steps=37, eta=0.5, skip="quadratic")
    cfg = compose_cfg(
        "sample",
        ["sampler=ddim50", 'sampler.respacing="10,15,20"', "sampler.steps=null", "ckpt=unused"],
    )
    sampler = instantiate(cfg.sampler)
    assert sampler.respacing == "10,15,20" and sampler.num_function_evals(300) == 45
    cfg = compose_cfg("sample", ["sampler=ddpm", "sampler.respacing=[10,15,20]", "ckpt=unused"])
    assert instantiate(cfg.sampler) == DDPMSampler(respacing="10,15,20")


def test_sampler_pickles_without_its_cache():
    import pickle

    sampler = get_sampler("ddim10")
    sampler.respaced(make_diffusion())
    clone = pickle.loads(pickle.dumps(sampler))
    assert clone == sampler and clone._cache == {}
