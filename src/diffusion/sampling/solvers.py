"""Fast samplers that integrate in the noise level σ (see ``diffusion.sampling.sigmas``).

| sampler | paper | model calls for N levels |
|---|---|---|
| ``DPMSolverPP2MSampler`` | DPM-Solver++(2M), Lu et al. 2022, arXiv 2211.01095, Alg. 2 | N |
| ``HeunSampler`` | Karras et al. 2022 (EDM), arXiv 2206.00364, Alg. 1 and 2 | 2N − 1 |
| ``EulerAncestralSampler`` | k-diffusion's ``sample_euler_ancestral`` | N |

All work on x̃ = x_t/√ᾱ (VE coordinates) from x̃ = x_T √(1 + σ_max²), x_T ~ N(0, I) as for
DDIM, and finish with x_0 = D(x̃; σ_min) (the step to σ = 0, where the ODE's slope
(x̃ − D)/σ is singular), as DDIM's last step does.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from diffusion.process._tensor import randn_like
from diffusion.sampling.sigmas import ContinuousSampler, progress_range


# ------------------------------------------------------------------- DPM-Solver++(2M)
def dpm_solver_pp_step(x, denoised, sigma: float, sigma_next: float):
    """x̃' = (σ'/σ) x̃ − (e^{−h} − 1) D, h = λ' − λ = log(σ/σ') (DPM-Solver++ eq. 9 with
    α = 1 in VE coordinates; with D = D(x̃; σ) it is DPM-Solver++(1) = DDIM)."""
    h = math.log(sigma / sigma_next)
    return (sigma_next / sigma) * x - math.expm1(-h) * denoised


def dpm_solver_pp_2m_denoised(denoised, old_denoised, h: float, h_last: float):
    """D = (1 + 1/(2r)) D_i − 1/(2r) D_{i−1}, r = h_{i−1}/h_i (DPM-Solver++ Alg. 2, line 7)."""
    r = h_last / h
    return (1.0 + 0.5 / r) * denoised - (0.5 / r) * old_denoised


@dataclasses.dataclass
class DPMSolverPP2MSampler(ContinuousSampler):
    """DPM-Solver++(2M): the multistep second-order data-prediction solver of the
    probability-flow ODE. One model call per noise level: the first step is first order
    (no history yet) and the last, to σ = 0, is x_0 = D (h = ∞).

    Args:
        steps: number of noise levels N = model evaluations.
        schedule: ``"logsnr"`` (uniform in λ; default), ``"time_uniform"``, ``"karras"``.
        rho: ρ of the Karras schedule.
    """

    steps: int = 20
    schedule: str = "logsnr"
    rho: float = 7.0

    def _solve(self, denoise, x, sigmas, generator, progress):
        old_denoised, h_last = None, None
        for i in progress_range(len(sigmas) - 1, progress):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                return denoised
            h = math.log(sigma / sigma_next)
            corrected = (
                denoised if old_denoised is None
                else dpm_solver_pp_2m_denoised(denoised, old_denoised, h, h_last)
            )
            x = dpm_solver_pp_step(x, corrected, sigma, sigma_next)
            old_denoised, h_last = denoised, h
        return x


# --------------------------------------------------------------------------- Heun (EDM)
@dataclasses.dataclass
class HeunSampler(ContinuousSampler):
    """EDM's sampler: Heun's method on the probability-flow ODE (Alg. 1), with optional
    stochastic churn (Alg. 2). ``steps`` = N levels give 2N − 1 model calls (the last step,
    to σ = 0, is Euler). EDM's CIFAR-10 setting is N = 18 (35 calls), ρ = 7.

    Args (EDM Alg. 2 names in brackets):
        steps: N; schedule, rho: as for every σ sampler (default Karras, ρ = 7).
        s_churn [S_churn]: total churn; γ_i = min(S_churn/N, √2 − 1). 0 = Alg. 1, deterministic.
        s_tmin, s_tmax [S_tmin, S_tmax]: churn only where S_tmin ≤ σ_i ≤ S_tmax.
        s_noise [S_noise]: scale of the added noise.

    σ̂ = σ_i (1 + γ_i) is capped at σ_max = σ_{T−1}: the network has no timestep beyond it.
    """

    steps: int = 18
    schedule: str = "karras"
    rho: float = 7.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        self.s_churn, self.s_noise = float(self.s_churn), float(self.s_noise)
        self.s_tmin, self.s_tmax = float(self.s_tmin), float(self.s_tmax)
        if self.s_churn < 0 or self.s_noise < 0:
            raise ValueError(
                f"s_churn and s_noise must be >= 0, got s_churn={self.s_churn}, "
                f"s_noise={self.s_noise}"
            )

    def num_function_evals(self, num_timesteps: int) -> int:
        return 2 * super().num_function_evals(num_timesteps) - 1

    def _has_churn(self) -> bool:
        return self.s_churn > 0

    def _sigma_hat(self, sigma: float, sigma_max: float) -> float:
        """σ̂_i = σ_i (1 + γ_i), EDM Alg. 2 lines 4-5, capped at σ_max."""
        if not self.s_churn or not self.s_tmin <= sigma <= self.s_tmax:
            return sigma
        gamma = min(self.s_churn / self.steps, math.sqrt(2.0) - 1.0)
        return min(sigma * (1.0 + gamma), sigma_max)

    def _evaluated_sigmas(self, sigmas: np.ndarray) -> np.ndarray:
        hats = [self._sigma_hat(float(s), float(sigmas[0])) for s in sigmas[:-1]]
        return np.array([*hats, *sigmas[1:-1]])

    def _solve(self, denoise, x, sigmas, generator, progress):
        for i in progress_range(len(sigmas) - 1, progress):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            sigma_hat = self._sigma_hat(sigma, float(sigmas[0]))
            if sigma_hat > sigma:  # Alg. 2 line 6: x̂ = x + √(σ̂² − σ²) S_noise ε
                x = x + math.sqrt(sigma_hat**2 - sigma**2) * self.s_noise * randn_like(x, generator)
            x = self._heun_step(denoise, x, sigma_hat, sigma_next)
        return x

    @staticmethod
    def _heun_step(denoise, x, sigma_hat: float, sigma_next: float):
        """EDM Alg. 1 lines 4-8: an Euler step, then the trapezoidal correction unless σ' = 0."""
        d = (x - denoise(x, sigma_hat)) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next == 0:
            return x_next
        d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
        return x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)


# ----------------------------------------------------------------------- Euler ancestral
def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up): go deterministically to σ_down, then add noise σ_up, so that
    σ_down² + σ_up² = σ'² and σ_up = η σ' √(1 − σ'²/σ²) (η = 1: the DDPM posterior's
    share of fresh noise; k-diffusion's ``get_ancestral_step``)."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(1.0 - (sigma_next / sigma) ** 2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


@dataclasses.dataclass
class EulerAncestralSampler(ContinuousSampler):
    """Ancestral sampling with Euler steps in σ (k-diffusion's ``sample_euler_ancestral``):
    x̃ ← x̃ + (σ_down − σ) (x̃ − D)/σ + σ_up S_noise z. One model call per level.

    Args:
        steps, schedule, rho: as for every σ sampler (default ``time_uniform``).
        eta: share of fresh noise (1 = ancestral, 0 = the deterministic Euler method,
            which on ``time_uniform`` steps is DDIM with η = 0).
        s_noise: scale of the added noise.
    """

    steps: int = 50
    schedule: str = "time_uniform"
    rho: float = 7.0
    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        self.eta, self.s_noise = float(self.eta), float(self.s_noise)
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.s_noise < 0:
            raise ValueError(f"s_noise must be >= 0, got {self.s_noise}")

    def _solve(self, denoise, x, sigmas, generator, progress):
        for i in progress_range(len(sigmas) - 1, progress):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            denoised = denoise(x, sigma)
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.eta)
            x = x + (sigma_down - sigma) * (x - denoised) / sigma
            if sigma_up > 0:
                x = x + sigma_up * self.s_noise * randn_like(x, generator)
        return x
