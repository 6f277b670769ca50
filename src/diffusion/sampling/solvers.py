"""Fast samplers that integrate in the noise level σ (see ``diffusion.sampling.sigmas``).

| sampler | paper | model calls for N levels |
|---|---|---|
| ``DPMSolverPP2MSampler`` | DPM-Solver++(2M), Lu et al. 2022, arXiv 2211.01095, Alg. 2 | N |
| ``DPMSolverPP3MSampler`` | DPM-Solver++(3M), the same paper's third-order multistep method | N |
| ``UniPCSampler`` | UniPC, Zhao et al. 2023, arXiv 2302.04867, Alg. 2-3 (B(h) of eq. 8) | N |
| ``HeunSampler`` | Karras et al. 2022 (EDM), arXiv 2206.00364, Alg. 1 and 2 | 2N − 1 |
| ``EulerAncestralSampler`` | k-diffusion's ``sample_euler_ancestral`` | N |
| ``ConsistencySampler`` | consistency models, Song et al. 2023, arXiv 2303.01469, Alg. 1 | N |

All work on x̃ = x_t/√ᾱ (VE coordinates) from x̃ = x_T √(1 + σ_max²), x_T ~ N(0, I) as for
DDIM, and finish with x_0 = D(x̃; σ_{N−1}) (the step to σ = 0, where the ODE's slope
(x̃ − D)/σ is singular), as DDIM's last step does. In these coordinates α = 1, so the
exponential integrators' updates are the papers' with α_t = 1 and σ_t the VE σ, and
λ = −log σ.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from diffusion.process._tensor import randn_like
from diffusion.sampling.distillation import SIGMA_DATA, consistency_function
from diffusion.sampling.sigmas import ContinuousSampler, progress_range

# Below this many levels the last steps drop to lower orders (DPM-Solver, arXiv 2206.00927
# sec. 3.4; UniPC sec. 3.3): a high-order update on the final, largest steps in λ is unstable.
LOWER_ORDER_FINAL_BELOW = 15


def step_order(order: int, history: int, step: int, num_steps: int, lower_order_final: bool) -> int:
    """The order of step ``step`` (0-based) of ``num_steps``: at most ``order``, at most the
    number of known outputs ``history`` (a multistep method warms up), and with
    ``lower_order_final`` below 15 steps at most ``num_steps − step`` (the last step is
    first order, the one before it at most second)."""
    order = min(order, history)
    if lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW:
        order = min(order, num_steps - step)
    return order


# ------------------------------------------------------------------- DPM-Solver++
def dpm_solver_pp_step(x, denoised, sigma: float, sigma_next: float):
    """x̃' = (σ'/σ) x̃ − (e^{−h} − 1) D, h = λ' − λ = log(σ/σ') (DPM-Solver++ eq. 9 with
    α = 1 in VE coordinates; with D = D(x̃; σ) it is DPM-Solver++(1) = DDIM)."""
    h = math.log(sigma / sigma_next)
    return (sigma_next / sigma) * x - math.expm1(-h) * denoised


def dpm_solver_pp_2m_denoised(denoised, old_denoised, h: float, h_last: float):
    """D = (1 + 1/(2r)) D_i − 1/(2r) D_{i−1}, r = h_{i−1}/h_i (DPM-Solver++ Alg. 2, line 7)."""
    r = h_last / h
    return (1.0 + 0.5 / r) * denoised - (0.5 / r) * old_denoised


def dpm_solver_pp_3m_step(x, history, sigma_next: float):
    """DPM-Solver++(3M) (arXiv 2211.01095, App. B's third-order multistep update in its
    data-prediction form): with the outputs D_0, D_{-1}, D_{-2} at σ_0 < σ_{-1} < σ_{-2}
    (``history``, most recent last), h = λ' − λ_0, r_0 = (λ_0 − λ_{-1})/h, r_1 = (λ_{-1} − λ_{-2})/h,

        D1_0 = (D_0 − D_{-1})/r_0,   D1_1 = (D_{-1} − D_{-2})/r_1,
        D1 = D1_0 + r_0 (D1_0 − D1_1)/(r_0 + r_1),   D2 = (D1_0 − D1_1)/(r_0 + r_1),
        x̃' = (σ'/σ_0) x̃ − φ₁ D_0 + (φ₁/h + 1) D1 − ((φ₁ + h)/h² − 1/2) D2,   φ₁ = e^{−h} − 1.
    """
    (s2, d2), (s1, d1), (s0, d0) = history
    h = math.log(s0 / sigma_next)
    r0, r1 = math.log(s1 / s0) / h, math.log(s2 / s1) / h
    d1_0, d1_1 = (d0 - d1) / r0, (d1 - d2) / r1
    first = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    second = (d1_0 - d1_1) / (r0 + r1)
    phi1 = math.expm1(-h)
    return ((sigma_next / s0) * x - phi1 * d0 + (phi1 / h + 1.0) * first
            - ((phi1 + h) / h**2 - 0.5) * second)


def dpm_solver_pp_multistep(x, history, sigma_next: float, order: int):
    """One DPM-Solver++ step of ``order`` 1, 2 or 3 from the last ``order`` outputs."""
    (sigma, denoised) = history[-1]
    if order >= 3:
        return dpm_solver_pp_3m_step(x, history[-3:], sigma_next)
    if order == 2:
        (old_sigma, old_denoised) = history[-2]
        h, h_last = math.log(sigma / sigma_next), math.log(old_sigma / sigma)
        denoised = dpm_solver_pp_2m_denoised(denoised, old_denoised, h, h_last)
    return dpm_solver_pp_step(x, denoised, sigma, sigma_next)


@dataclasses.dataclass
class DPMSolverPP2MSampler(ContinuousSampler):
    """DPM-Solver++(2M): the multistep second-order data-prediction solver of the
    probability-flow ODE. One model call per noise level: the first step is first order
    (no history yet) and the last, to σ = 0, is x_0 = D (h = ∞).

    Args:
        steps: number of noise levels N = model evaluations.
        schedule, rho, sigma_max, sigma_min: the grid (``ContinuousSampler``); by default
            Karras's from σ = 80 (``DEFAULT_SIGMA_MAX``).
        lower_order_final: below 15 steps, the step before the last is at most second
            order (only matters for 3M; the last step is first order anyway).
    """

    ORDER = 2
    steps: int = 20
    lower_order_final: bool = True

    def _solve(self, denoise, x, sigmas, generator, progress):
        history, num_steps = [], len(sigmas) - 1
        for i in progress_range(num_steps, progress):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                return denoised
            history = [*history[-(self.ORDER - 1):], (sigma, denoised)] if self.ORDER > 1 else [(sigma, denoised)]
            order = step_order(self.ORDER, len(history), i, num_steps, self.lower_order_final)
            x = dpm_solver_pp_multistep(x, history, sigma_next, order)
        return x


@dataclasses.dataclass
class DPMSolverPP3MSampler(DPMSolverPP2MSampler):
    """DPM-Solver++(3M): as 2M, third order once three outputs are known (the first two
    steps are first and second order). One model call per noise level."""

    ORDER = 3
    steps: int = 10


# ------------------------------------------------------------------------------- UniPC
def unipc_update(x, current, older, sigma_next: float, order: int, variant: str = "bh2",
                 denoised_next=None):
    """UniPC's predictor UniP-p (``denoised_next`` None) or corrector UniC-p (given the
    output D' at the predicted point, no extra model call) from σ_0 to σ' (Zhao et al. 2023,
    arXiv 2302.04867, Alg. 2 and 3 in the data-prediction form, α = 1):

        x̃' = (σ'/σ_0) x̃ − φ₁ D_0 − B(h) Σ_m a_m (D_{-m} − D_0)/r_m   [+ a_p (D' − D_0) for UniC]

    with h = λ' − λ_0, r_m = (λ_{-m} − λ_0)/h (negative: the earlier points), φ₁ = e^{−h} − 1,
    B(h) = −h (bh1) or e^{−h} − 1 (bh2; eq. 8's two choices), and a the solution of the
    order conditions R a = g (eq. 7: R_km = r_m^{k−1}, g_k = k! φ_{k+1}(h) h/B(h), computed by
    the recursion φ_{k+1} = (φ_k − 1/k!)/(−h)); UniP-2 and UniC-1 use a = 1/2 (sec. 3.2).
    ``current`` is (σ_0, D_0); ``older`` the earlier (σ, D), most recent last.
    """
    sigma, denoised = current
    h = math.log(sigma / sigma_next)
    hh = -h
    phi1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else phi1
    ratios, differences = [], []
    for old_sigma, old_denoised in reversed(older[len(older) - (order - 1):] if order > 1 else []):
        ratio = math.log(sigma / old_sigma) / h
        ratios.append(ratio)
        differences.append((old_denoised - denoised) / ratio)
    ratios.append(1.0)
    rows, g = [], []
    phi_k, factorial = phi1 / hh - 1.0, 1.0
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in ratios])
        g.append(phi_k * factorial / b_h)
        factorial *= k + 1
        phi_k = phi_k / hh - 1.0 / factorial
    base = (sigma_next / sigma) * x - phi1 * denoised
    if denoised_next is None:  # UniP
        if not differences:
            return base
        rhos = [0.5] if order == 2 else np.linalg.solve(np.array(rows)[:-1, :-1], np.array(g)[:-1])
        return base - b_h * sum(float(a) * d for a, d in zip(rhos, differences, strict=True))
    rhos = [0.5] if order == 1 else np.linalg.solve(np.array(rows), np.array(g))
    correction = sum((float(a) * d for a, d in zip(rhos[:-1], differences, strict=True)),
                     torch.zeros_like(denoised))
    return base - b_h * (correction + float(rhos[-1]) * (denoised_next - denoised))


@dataclasses.dataclass
class UniPCSampler(ContinuousSampler):
    """UniPC (Zhao et al. 2023): a multistep predictor UniP of ``order`` p, then at each new
    level the corrector UniC, which reuses the model output at the predicted point (the one
    the next step needs anyway) to raise the accuracy to order p + 1 at no extra model call.
    One model call per noise level; the last step, to σ = 0, is x_0 = D.

    Args:
        steps: number of noise levels N = model evaluations.
        order: p, 1 to 3 (the paper's UniPC-p; 2 and 3 are the usual choices).
        variant: ``"bh2"`` (B(h) = e^{−h} − 1) or ``"bh1"`` (B(h) = −h), eq. 8.
        corrector: apply UniC (False: UniP alone, order p).
        lower_order_final: below 15 steps the last steps are of lower order (see above).
        schedule, rho, sigma_max, sigma_min: the grid (``ContinuousSampler``); by default
            Karras's from σ = 80 (``DEFAULT_SIGMA_MAX``).
    """

    steps: int = 10
    order: int = 2
    variant: str = "bh2"
    corrector: bool = True
    lower_order_final: bool = True

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3 (UniPC-p), got {self.order!r}")
        if self.variant not in ("bh1", "bh2"):
            raise ValueError(f"variant must be 'bh1' or 'bh2' (UniPC eq. 8), got {self.variant!r}")

    def _solve(self, denoise, x, sigmas, generator, progress):
        history, num_steps = [], len(sigmas) - 1
        last_x, last_order = None, None
        for i in progress_range(num_steps, progress):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            denoised = denoise(x, sigma)
            if self.corrector and last_x is not None:
                x = unipc_update(last_x, history[-1], history[:-1], sigma, last_order, self.variant,
                                 denoised_next=denoised)
            history = [*history[-(self.order - 1):], (sigma, denoised)] if self.order > 1 else [(sigma, denoised)]
            if sigma_next == 0:
                return denoised
            order = step_order(self.order, len(history), i, num_steps, self.lower_order_final)
            last_x, last_order = x, order
            x = unipc_update(x, history[-1], history[:-1], sigma_next, order, self.variant)
        return x


# --------------------------------------------------------------------------- Heun (EDM)
@dataclasses.dataclass
class HeunSampler(ContinuousSampler):
    """EDM's sampler: Heun's method on the probability-flow ODE (Alg. 1), with optional
    stochastic churn (Alg. 2). ``steps`` = N levels give 2N − 1 model calls (the last step,
    to σ = 0, is Euler). EDM's CIFAR-10 setting is N = 18 (35 calls), ρ = 7.

    Args (EDM Alg. 2 names in brackets):
        steps: N; schedule, rho, sigma_max, sigma_min: as for every σ sampler (default
            Karras, ρ = 7, from σ_max = 80 as EDM).
        s_churn [S_churn]: total churn; γ_i = min(S_churn/N, √2 − 1). 0 = Alg. 1, deterministic.
        s_tmin, s_tmax [S_tmin, S_tmax]: churn only where S_tmin ≤ σ_i ≤ S_tmax.
        s_noise [S_noise]: scale of the added noise.

    σ̂ = σ_i (1 + γ_i) is capped at the grid's first level: the network has no timestep
    beyond σ_{T−1}, and a capped grid starts from noise at its σ_max.
    """

    steps: int = 18
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
    sigma_max: float | None = None
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


# ------------------------------------------------------------------- consistency models
@dataclasses.dataclass
class ConsistencySampler(ContinuousSampler):
    """Multistep consistency sampling (Song et al. 2023, arXiv 2303.01469, Alg. 1) of a
    consistency student of distill.py (``method=consistency``): x_0 = f(x̃, σ_max) from the
    noise, then at each further level σ_k of the grid, x̃ = x_0 + √(σ_k² − σ_min²) z and
    x_0 = f(x̃, σ_k), with f the student's consistency function
    (``diffusion.sampling.distillation.consistency_function``) and σ_min the process's σ_0.
    One model call per level; ``steps`` = 1 is the one-step sampler.

    Args:
        steps, schedule, rho, sigma_max, sigma_min: the levels, as for every σ sampler.
        sigma_data: σ_d of the consistency scalings (0.5 for images in [−1, 1]).
    """

    steps: int = 1
    sigma_data: float = SIGMA_DATA

    def _solve(self, denoise, x, sigmas, generator, progress):
        boundary = denoise.levels.sigma_min
        x0 = x
        for i in progress_range(len(sigmas) - 1, progress):
            sigma = float(sigmas[i])
            if i > 0:
                x = x0 + math.sqrt(max(sigma**2 - boundary**2, 0.0)) * randn_like(x0, generator)
            x0 = consistency_function(denoise, x, sigma, boundary, self.sigma_data)
        return x0
