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
