"""The continuous-noise-level view of a discrete Gaussian process, for ODE/SDE solvers.

Karras et al. 2022 (EDM, arXiv 2206.00364, sec. 2 and App. C.1) write any Gaussian
diffusion as x̃ = x_0 + σ n, n ~ N(0, I). For the discrete process x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε
that is x̃ = x_t/√ᾱ_t ("VE coordinates") with

    σ_t = √((1 − ᾱ_t)/ᾱ_t),   t = 0..T−1,                                        (1)

and the probability-flow ODE (EDM eq. 1 with σ(t) = t and eq. 3's score (D − x̃)/σ²) is
dx̃/dσ = (x̃ − D(x̃; σ))/σ with the denoiser D(x̃; σ) = E[x_0 | x̃]. A network trained at the T grid steps gives D at any σ in
[σ_0, σ_{T−1}] at a fractional timestep: t(σ) is linear in log σ between the neighbouring
steps (crowsonkb/k-diffusion's ``DiscreteSchedule.sigma_to_t``), and the network sees
x = x̃ √ᾱ(σ) = x̃/√(1+σ²). ``GaussianDataDenoiser`` (process.analytic) inverts the same
interpolation, so the oracle is exact at every σ a solver visits.

Notation (identifier -> symbol):

=====================  ================================================================
``sigma``              σ, the noise level of x̃ (EDM's σ; DPM-Solver's σ_t/α_t)
``x`` in the solvers   x̃ = x_t/√ᾱ, the VE coordinates
``denoised``           D(x̃; σ), the model's x̂_0
``c_in``               1/√(1+σ²) = √ᾱ(σ), the input scaling (EDM Table 1, VP column)
``c_skip``, ``c_out``  D = c_skip x̃ + c_out F, F the network's mean output (EDM eq. 7)
λ                      −log σ, half the log-SNR (DPM-Solver++, arXiv 2211.01095, sec. 2)
=====================  ================================================================
"""

from __future__ import annotations

import abc
import dataclasses
import math

import numpy as np
import torch

from diffusion.process._tensor import timestep_scale
from diffusion.process.gaussian_diffusion import ModelMeanType
from diffusion.sampling import steps as _steps
from diffusion.sampling.base import Sampler, _check_base_process


class NoiseLevels:
    """σ_t of eq. (1) for the T steps of ``diffusion`` and the map between σ and fractional t.

    σ_t must increase strictly with t (true for every β schedule with β_t > 0).
    """

    def __init__(self, diffusion):
        self.num_timesteps = int(diffusion.num_timesteps)
        alphas_cumprod = np.asarray(diffusion.alphas_cumprod, np.float64)
        if not alphas_cumprod[-1] > 0:
            raise ValueError(
                "the σ-space samplers need a finite σ_max, but this process has zero terminal "
                "SNR (ᾱ_(T-1) = 0, σ = ∞; Lin et al. 2023): use a DDIM or DDPM sampler"
            )
        self.sigmas = np.sqrt(1.0 / alphas_cumprod - 1.0)  # as the process's sqrt_recipm1_...
        self.log_sigmas = np.log(self.sigmas)
        if not (np.diff(self.log_sigmas) > 0).all():
            raise ValueError("σ_t = √((1−ᾱ_t)/ᾱ_t) must increase strictly with t")

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float) -> float:
        """The fractional index whose σ is ``sigma``: linear in log σ between grid steps."""
        log_sigma = float(np.log(sigma))  # np.log, as for the table: the grid maps exactly
        # a σ from exp(log σ_i) may miss the end points by an ulp; anything further is a bug
        if not self.log_sigmas[0] - 1e-9 <= log_sigma <= self.log_sigmas[-1] + 1e-9:
            raise ValueError(
                f"σ = {sigma!r} is outside the process's range [{self.sigma_min}, {self.sigma_max}]"
            )
        return float(np.interp(log_sigma, self.log_sigmas, np.arange(self.num_timesteps)))

    def t_to_sigma(self, t) -> np.ndarray:
        """σ at (fractional) indices ``t``: exp of log σ interpolated linearly in t."""
        return np.exp(np.interp(t, np.arange(self.num_timesteps), self.log_sigmas))


# ---------------------------------------------------------------- step schedules
# A grid is the N noise levels at which the model is evaluated, descending, then σ = 0: the
# last step goes from the N-th level to the data with x_0 = D (the ODE's slope (x̃ − D)/σ is
# singular at 0, so every solver's last update is first order there, DDIM's included).
#
# Grids in the discrete time t (the field's names; Lin et al. 2023, arXiv 2305.08891, Table 2),
# for t in [0, T − 1] (S = T steps):
#   leading   t_i = i·⌊S/N⌋, i < N          DDIM's and improved-diffusion's "ddimN" when N | T:
#                                          starts below T − 1 and spends its last call at t = 0
#   trailing  t_i = round(S − i·S/N) − 1   starts at T − 1; the last call at t = T/N − 1
#   linspace  N reals from T − 1 to 0      the evenly spaced steps (IDDPM sec. 4; "time_uniform")
# Grids in σ, N + 1 levels from σ_hi down to σ_lo of which the first N are evaluated (the step
# from the N-th level goes to 0 instead of σ_lo, whose evaluation would change nothing):
#   logsnr    uniform in λ = −log σ         DPM-Solver, arXiv 2206.00927 sec. 3.3
#   karras    σ^{1/ρ} uniform               EDM eq. 5
# σ_hi is the process's σ_{T−1} unless ``sigma_max`` caps it: a cosine schedule's σ_{T−1} is
# 2·10⁴ at T = 1000 (σ_{T−2} = 642), where D is the data mean, so the first calls of an
# uncapped grid are wasted (EDM caps at 80). σ_lo is σ_0 unless ``sigma_min`` raises it. On
# the t grids the caps narrow [0, T − 1] to [t(σ_lo), t(σ_hi)] (then S = t(σ_hi) + 1 − t(σ_lo)).
# Every σ sampler's default grid, chosen by measurement (README, "Few-step sampling";
# bench/nfe_quality.py on the quickstart): Karras's ρ = 7 levels from σ = 80 (EDM's cap) down.
# At 5 to 20 NFE it beat the logSNR grid and the t grids at 10 and 20 NFE, and an uncapped
# grid everywhere (a cosine schedule's σ_{T−1} = 2·10⁴ spends the first calls on D = the mean).
DEFAULT_SIGMA_MAX = 80.0

TIME_SCHEDULES = ("leading", "trailing", "linspace", "time_uniform")
SIGMA_SCHEDULES = ("logsnr", "karras")
SCHEDULES = (*TIME_SCHEDULES, *SIGMA_SCHEDULES)


def grid_timesteps(schedule: str, n: int, t_hi: float, t_lo: float = 0.0) -> np.ndarray:
    """The n (fractional) timesteps of a time grid over [t_lo, t_hi], descending (integers
    for the uncapped [0, T − 1])."""
    if schedule in ("linspace", "time_uniform"):
        return np.linspace(t_hi, t_lo, n)
    span = t_hi + 1.0 - t_lo
    if schedule == "leading":
        grid = t_lo + np.arange(n)[::-1] * math.floor(span / n)
    else:  # trailing
        grid = t_lo + _steps.trailing_offsets(span, n)
    return np.clip(grid, t_lo, t_hi)


def sigma_range(levels: NoiseLevels, sigma_max: float | None, sigma_min: float | None) -> tuple[float, float]:
    """(σ_hi, σ_lo): the process's range, narrowed by the caps."""
    hi = levels.sigma_max if sigma_max is None else min(float(sigma_max), levels.sigma_max)
    lo = levels.sigma_min if sigma_min is None else max(float(sigma_min), levels.sigma_min)
    if not lo < hi:
        raise ValueError(
            f"sigma_min={sigma_min} and sigma_max={sigma_max} leave no range inside the process's "
            f"[{levels.sigma_min:.4g}, {levels.sigma_max:.4g}]: give sigma_min < sigma_max"
        )
    return hi, lo


def step_sigmas(schedule: str, levels: NoiseLevels, n: int, rho: float = 7.0,
                sigma_max: float | None = None, sigma_min: float | None = None) -> np.ndarray:
    """(n + 1,) descending: the n evaluated noise levels (see above), then 0."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    hi, lo = sigma_range(levels, sigma_max, sigma_min)
    if schedule in TIME_SCHEDULES:
        t_hi = levels.num_timesteps - 1.0 if sigma_max is None else levels.sigma_to_t(hi)
        t_lo = 0.0 if sigma_min is None else levels.sigma_to_t(lo)
        sigmas = levels.t_to_sigma(grid_timesteps(schedule, n, t_hi, t_lo))
    elif schedule == "logsnr":
        sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), n + 1))[:n]
    else:
        ramp = np.linspace(0.0, 1.0, n + 1)[:n]
        sigmas = (hi ** (1.0 / rho) + ramp * (lo ** (1.0 / rho) - hi ** (1.0 / rho))) ** rho
    sigmas[0] = min(sigmas[0], hi) if schedule in TIME_SCHEDULES else hi  # exact end point
    if not (np.diff(sigmas) < 0).all():
        raise ValueError(
            f"{n} steps of the {schedule!r} grid between σ = {hi:.4g} and {lo:.4g} repeat a noise "
            f"level: ask for fewer steps or widen sigma_max/sigma_min"
        )
    return np.append(sigmas, 0.0)


# ---------------------------------------------------------------------- denoiser
def _eps_scalings(sigma: float) -> tuple[float, float]:
    """ε-prediction: x_0 = (x − √(1−ᾱ) ε)/√ᾱ = x̃ − σ ε (EDM Table 1, VP)."""
    return 1.0, -sigma


def _x0_scalings(sigma: float) -> tuple[float, float]:
    """x_0-prediction: D = F."""
    return 0.0, 1.0


def _v_scalings(sigma: float) -> tuple[float, float]:
    """v-prediction: x_0 = √ᾱ x − √(1−ᾱ) v = x̃/(1+σ²) − σ/√(1+σ²) v (Salimans & Ho 2022,
    arXiv 2202.00512, sec. 4, with √ᾱ = 1/√(1+σ²), x = √ᾱ x̃)."""
    return 1.0 / (1.0 + sigma**2), -sigma / math.sqrt(1.0 + sigma**2)


_SCALINGS = {
    ModelMeanType.EPSILON: _eps_scalings,
    ModelMeanType.START_X: _x0_scalings,
    ModelMeanType.V: _v_scalings,
}


def check_mean_type(diffusion) -> None:
    """The σ-space solvers need x̂_0 at any σ; previous_x models only give it on the grid."""
    if diffusion.model_mean_type not in _SCALINGS:
        raise ValueError(
            f"model_mean_type={diffusion.model_mean_type.value!r} is not supported by the "
            f"continuous-σ samplers (valid: {', '.join(m.value for m in _SCALINGS)}): a "
            f"previous_x network predicts the mean of x_(t-1) and its x_0 needs that grid "
            f"step's posterior coefficients, which do not exist between steps; use a DDIM "
            f"or DDPM sampler"
        )


class Denoiser:
    """D(x̃; σ) = c_skip x̃ + c_out F(c_in x̃, t(σ)) for a model of the discrete process.

    The model is called as the process calls it, ``model(x, t_model, **model_kwargs)``, with
    the fractional t(σ), as t·1000/T floats when ``rescale_timesteps`` (the process's rule).
    Only the first C output channels (the mean part) are used for learned variances.
    """

    def __init__(self, diffusion, model, model_kwargs=None, clip_denoised=True):
        check_mean_type(diffusion)
        self.levels = NoiseLevels(diffusion)
        self.scalings = _SCALINGS[diffusion.model_mean_type]
        self.learned_variance = diffusion.model_var_type.is_learned()
        self.output_channels = diffusion.model_output_channels
        self.time_scale = timestep_scale(diffusion.num_timesteps, diffusion.rescale_timesteps)
        self.model = model
        self.model_kwargs = {} if model_kwargs is None else model_kwargs
        self.clip_denoised = clip_denoised

    def model_timesteps(self, sigma: float, x: torch.Tensor) -> torch.Tensor:
        """(B,) float t_model for noise level ``sigma`` (at least float32: t reaches 1000)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        t = self.levels.sigma_to_t(sigma) * self.time_scale
        return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x̂_0 for x̃ = ``x`` (B, C, ...) at noise level ``sigma`` (a float > 0)."""
        c_in = 1.0 / math.sqrt(1.0 + sigma**2)
        out = self.model(x * c_in, self.model_timesteps(sigma, x), **self.model_kwargs)
        channels = self.output_channels(x.shape[1])
        if tuple(out.shape) != (x.shape[0], channels, *x.shape[2:]):
            raise ValueError(
                f"model output has shape {tuple(out.shape)}, expected "
                f"{(x.shape[0], channels, *x.shape[2:])}"
            )
        if self.learned_variance:
            out = out[:, : x.shape[1]]  # (B, 2C, ...) -> (B, C, ...): the mean part
        c_skip, c_out = self.scalings(sigma)
        denoised = c_skip * x + c_out * out if c_skip else c_out * out
        return denoised.clamp(-1, 1) if self.clip_denoised else denoised


def progress_range(n: int, progress):
    """range(n), wrapped in a tqdm bar (True) or a given callable."""
    steps = range(n)
    if callable(progress):
        return progress(steps)
    if progress:
        from tqdm.auto import tqdm  # lazy: tqdm is optional

        return tqdm(steps)
    return steps


# ------------------------------------------------------------------- sampler base
@dataclasses.dataclass
class ContinuousSampler(Sampler):
    """Base of the samplers that integrate in σ (VE coordinates) on the base process.

    Subclasses implement ``_solve(denoise, x, sigmas, generator, progress)``. Nothing is
    respaced: the model is called at fractional timesteps of the base process.

    Args:
        steps: the number N of evaluated noise levels σ_0 > ... > σ_{N−1} > 0 = σ_N.
        schedule: how they are placed (see "step schedules" above): ``"leading"``,
            ``"trailing"``, ``"linspace"`` (= ``"time_uniform"``) in t; ``"logsnr"``,
            ``"karras"`` in σ.
        rho: ρ of the Karras schedule (EDM eq. 5); unused by the others.
        sigma_max, sigma_min: the grid's range, inside the process's [σ_0, σ_{T−1}] (None:
            that end of it; on the t grids, t(σ_min) to t(σ_max)). The sampler starts at σ_max from x_T ~ N(0, I) taken as
            the noisy image at t(σ_max), as DDIM's leading grid starts below T − 1.
    """

    steps: int = 20
    schedule: str = "karras"
    rho: float = 7.0
    sigma_max: float | None = DEFAULT_SIGMA_MAX
    sigma_min: float | None = None

    def __post_init__(self):
        _steps.check_steps(self.steps)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        self.rho = float(self.rho)
        if not self.rho > 0:
            raise ValueError(f"rho must be positive (EDM eq. 5), got {self.rho}")
        for name in ("sigma_max", "sigma_min"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive noise level or null, got {value!r}")

    def sigmas(self, diffusion) -> np.ndarray:
        """The (steps + 1,) noise levels the solver steps through: ``steps`` evaluated, then 0."""
        _steps.check_steps(self.steps, diffusion.num_timesteps)
        return step_sigmas(self.schedule, NoiseLevels(diffusion), self.steps, self.rho,
                           self.sigma_max, self.sigma_min)

    def _evaluated_sigmas(self, sigmas: np.ndarray) -> np.ndarray:
        """The σ's at which the model is called (default: every level but the final 0)."""
        return sigmas[:-1]

    def _has_churn(self) -> bool:
        """Whether the model sees σ̂ > σ (Heun's churn), so that t depends on the process."""
        return False

    def timesteps(self, num_timesteps) -> list[float]:
        """The fractional original timesteps at which the model is called, ascending and
        distinct. They follow the process's σ_t, so pass the process (``timesteps(diffusion)``);
        an int T suffices only for the uncapped time grids without stochastic churn."""
        if not isinstance(num_timesteps, (int, np.integer)):
            levels = NoiseLevels(num_timesteps)
            sigmas = self._evaluated_sigmas(self.sigmas(num_timesteps))
            return sorted({levels.sigma_to_t(float(s)) for s in sigmas})
        capped = self.sigma_max is not None or self.sigma_min is not None
        if self.schedule not in TIME_SCHEDULES or self._has_churn() or capped:
            raise ValueError(
                f"the {self.schedule!r} schedule's timesteps depend on the process's noise "
                f"levels: call timesteps(diffusion) instead of timesteps({num_timesteps})"
            )
        _steps.check_steps(self.steps, int(num_timesteps))
        return sorted({float(t) for t in grid_timesteps(self.schedule, self.steps, num_timesteps - 1.0)})

    def num_function_evals(self, num_timesteps: int) -> int:
        """One model call per noise level (second-order multistep methods reuse the last)."""
        _steps.check_steps(self.steps, num_timesteps)
        return self.steps

    def respaced(self, diffusion):
        """The base process itself, after the checks (nothing is respaced)."""
        _check_base_process(diffusion)
        check_mean_type(diffusion)
        _steps.check_steps(self.steps, diffusion.num_timesteps)
        NoiseLevels(diffusion)  # a finite, increasing σ_t
        return diffusion

    def _run_loop(self, process, model, noise, *, clip_denoised=True, model_kwargs=None,
                  device=None, progress=False, generator=None) -> torch.Tensor:
        """Start from x̃_T = x_T √(1 + σ_max²): DDIM's x_T, in VE coordinates. (``device`` is
        the noise's, where everything already lives.)"""
        sigmas = self.sigmas(process)
        denoise = Denoiser(process, model, model_kwargs, clip_denoised)
        x = noise * math.sqrt(1.0 + sigmas[0] ** 2)
        with torch.no_grad():
            return self._solve(denoise, x, sigmas, generator, progress)

    @abc.abstractmethod
    def _solve(self, denoise, x, sigmas, generator, progress) -> torch.Tensor:
        """Integrate from x̃ at ``sigmas[0]`` to σ = 0; return x_0."""
