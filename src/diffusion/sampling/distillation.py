"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512): the targets, in σ space.

A student of N steps learns to do in one deterministic DDIM step what its teacher does in two,
on nested grids: the teacher's 2N levels are the student's N levels and the midpoints between
them (``nested_grids``). In VE coordinates x̃ = x_t/√ᾱ (``diffusion.sampling.sigmas``), DDIM's
step from σ to σ' with the denoiser's output D is x̃' = D + (σ'/σ)(x̃ − D) (x̃' = D at σ' = 0).
With the teacher's two steps σ → σ_mid → σ' ending at x̃'', the one student output D_s whose
single step also lands on x̃'' is (the paper's Algorithm 2, target x̃, with α = 1):

    D_s = (x̃'' − (σ'/σ) x̃) / (1 − σ'/σ),    D_s = x̃'' at σ' = 0.

The student is trained on ‖D_s − D_student(x̃; σ)‖² weighted by max(SNR, 1) = max(1/σ², 1), the
paper's "truncated SNR" weighting (sec. 4), which keeps the weight of the first, almost pure
noise steps from vanishing. Then the student becomes the teacher and N halves.

Pure math on a `Denoiser` (``diffusion.sampling.sigmas``): no Lightning; the training loop is
``diffusion.training.distill``.
"""

from __future__ import annotations

import numpy as np
import torch

from diffusion.sampling.sigmas import SCHEDULES, NoiseLevels, step_sigmas


def nested_grids(diffusion, steps: int, schedule: str = "karras", rho: float = 7.0,
                 sigma_max: float | None = None, sigma_min: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(student levels (steps + 1,), teacher levels (2·steps + 1,)), each ending at 0, with the
    student's evaluated levels the teacher's even ones. The σ grids (logsnr, karras) nest for
    every N (their N + 1 ramp points are every other of their 2N + 1); a grid that does not
    is refused."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    levels = NoiseLevels(diffusion)
    student = step_sigmas(schedule, levels, steps, rho, sigma_max, sigma_min)
    teacher = step_sigmas(schedule, levels, 2 * steps, rho, sigma_max, sigma_min)
    if not np.allclose(teacher[0:2 * steps:2], student[:steps], rtol=1e-9, atol=0):
        raise ValueError(
            f"the {schedule!r} grid of {steps} steps is not every other level of its grid of "
            f"{2 * steps}: progressive distillation needs nested grids; use schedule=karras or logsnr"
        )
    return student, teacher


def ddim_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """DDIM (η = 0) from σ to σ' in VE coordinates: x̃' = D + (σ'/σ)(x̃ − D); x̃' = D at σ' = 0."""
    if sigma_next == 0:
        return denoised
    return denoised + (sigma_next / sigma) * (x - denoised)


def student_target(teacher, x: torch.Tensor, sigma: float, sigma_mid: float, sigma_next: float) -> torch.Tensor:
    """D_s: the student output at (x̃, σ) whose one DDIM step to σ' equals the teacher's
    two steps σ → σ_mid → σ' (module doc). ``teacher`` is a denoiser D(x̃; σ)."""
    x_mid = ddim_step(x, teacher(x, sigma), sigma, sigma_mid)
    x_next = ddim_step(x_mid, teacher(x_mid, sigma_mid), sigma_mid, sigma_next)
    if sigma_next == 0:
        return x_next
    ratio = sigma_next / sigma
    return (x_next - ratio * x) / (1.0 - ratio)


def truncated_snr_weight(sigma: float) -> float:
    """max(SNR, 1) with SNR = α²/σ_VP² = 1/σ² in VE coordinates (Salimans & Ho 2022, sec. 4)."""
    return max(1.0 / sigma**2, 1.0)


# ------------------------------------------------------------ consistency distillation
# Consistency distillation (Song et al. 2023, arXiv 2303.01469, Alg. 2): a student f(x̃, σ) that
# maps any point of a probability-flow trajectory to its end at σ_min, trained so that f at
# (x̃_{n+1}, σ_{n+1}) agrees with the target network at the teacher's ODE step from there,
# (x̂_n, σ_n), with f(x̃, σ_min) = x̃ built in (the boundary condition, sec. 3):
#
#     f(x̃, σ) = c_skip(σ) x̃ + c_out(σ) D(x̃; σ),
#     c_skip = σ_d² / ((σ − σ_min)² + σ_d²),   c_out = (σ − σ_min) / √((σ − σ_min)² + σ_d²),
#
# Song et al.'s App. C form with the σ_min offset, written around the model's denoiser D
# rather than the raw network (as latent consistency models do, Luo et al. 2023, eq. 4's
# scalings) so that c_out → 1 away from σ_min and the student starts as its teacher's D.
SIGMA_DATA = 0.5  # EDM's σ_data for images in [−1, 1]


def consistency_scalings(sigma: float, sigma_min: float, sigma_data: float = SIGMA_DATA) -> tuple[float, float]:
    """(c_skip, c_out) above: (1, 0) at σ = σ_min, so f(x̃, σ_min) = x̃ whatever D is."""
    offset = sigma - sigma_min
    return sigma_data**2 / (offset**2 + sigma_data**2), offset / (offset**2 + sigma_data**2) ** 0.5


def consistency_function(denoise, x: torch.Tensor, sigma: float, sigma_min: float,
                         sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """f(x̃, σ) = c_skip x̃ + c_out D(x̃; σ) for a denoiser ``denoise``."""
    c_skip, c_out = consistency_scalings(sigma, sigma_min, sigma_data)
    if c_out == 0:
        return x
    return c_skip * x + c_out * denoise(x, sigma)


def consistency_levels(diffusion, num_levels: int, rho: float = 7.0, sigma_max: float | None = None) -> np.ndarray:
    """The N ≥ 2 training levels σ_max = σ_{N−1} > ... > σ_0 = σ_min of the process (its σ at
    t = 0), Karras's ρ-spacing (Song et al. 2023, sec. 3, after EDM eq. 5), ascending."""
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels={num_levels!r} must be an integer ≥ 2 (Song et al. use 18 to 40)")
    levels = NoiseLevels(diffusion)
    descending = step_sigmas("karras", levels, num_levels - 1, rho, sigma_max)  # N − 1 levels, then 0
    descending[-1] = levels.sigma_min
    return descending[::-1].copy()
