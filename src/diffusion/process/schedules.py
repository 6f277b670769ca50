"""Beta schedules β_1..β_T, float64 numpy arrays (index 0 holds β_1)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def linear_beta_schedule(num_diffusion_timesteps: int) -> np.ndarray:
    """Ho et al. (arXiv 2006.11239, sec. 4): β linear from 1e-4 to 0.02 at T = 1000.

    Both ends are scaled by 1000/T so that any T gives a process of similar total noise.
    The last beta, 20/T, must stay below 1 (at T <= 20 it would destroy the signal in
    one step and ᾱ_T = 0 divides by zero), so T must exceed 20.
    """
    if num_diffusion_timesteps <= 20:
        raise ValueError(
            f"the linear schedule needs num_diffusion_timesteps > 20 (its last beta is 20/T), "
            f"got {num_diffusion_timesteps}; use the cosine schedule for shorter processes"
        )
    scale = 1000.0 / num_diffusion_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    """IDDPM eq. 17 (arXiv 2102.09672) before normalisation: f(t) = cos²(((t + s)/(1 + s))·π/2).

    ``t`` runs over [0, 1]; ᾱ(t) = f(t)/f(0). The ratios in betas_for_alpha_bar cancel f(0).
    """
    return math.cos((t + s) / (1.0 + s) * math.pi / 2) ** 2


def betas_for_alpha_bar(
    num_diffusion_timesteps: int,
    alpha_bar: Callable[[float], float],
    max_beta: float = 0.999,
) -> np.ndarray:
    """Discretise a continuous ᾱ(t), t ∈ [0, 1], into T betas (IDDPM eq. 17 and after).

    β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta) for i = 0..T−1. The clip at 0.999 avoids
    the singularity at t = 1, where the cosine ᾱ reaches 0 (IDDPM sec. 3.2).
    """
    betas = [
        min(
            1.0
            - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps),
            max_beta,
        )
        for i in range(num_diffusion_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


def cosine_beta_schedule(num_diffusion_timesteps: int) -> np.ndarray:
    """IDDPM eq. 17 (arXiv 2102.09672): s = 0.008, betas clipped at 0.999."""
    return betas_for_alpha_bar(num_diffusion_timesteps, cosine_alpha_bar, max_beta=0.999)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale a schedule to zero terminal SNR (Lin et al. 2023, arXiv 2305.08891, Alg. 1).

    √ᾱ_t is shifted so that its last value is 0 and scaled so that its first value is kept:
    √ᾱ'_t = (√ᾱ_t − √ᾱ_T)·√ᾱ_1/(√ᾱ_1 − √ᾱ_T). The betas are then read back from the ratios
    ᾱ'_t/ᾱ'_{t−1}, so β'_T = 1 exactly and x_T is pure noise (SNR_T = ᾱ'_T/(1 − ᾱ'_T) = 0).
    With ᾱ_T = 0 the ε-parameterisation cannot recover x_0 at the last step; train with
    v prediction (Lin et al. sec. 3.2; GaussianDiffusion refuses ``epsilon`` there).

    :param betas: β_1..β_T, float64, T ≥ 2.
    :return: the rescaled β'_1..β'_T, float64, shape (T,).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(
            f"rescale_zero_terminal_snr needs a 1-D schedule of at least 2 betas, got shape "
            f"{betas.shape}"
        )
    sqrt_alphas_cumprod = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_alphas_cumprod[0], sqrt_alphas_cumprod[-1]
    if not first > last:
        raise ValueError(
            f"rescale_zero_terminal_snr needs a decreasing ᾱ (√ᾱ_1={first}, √ᾱ_T={last})"
        )
    # shift: the last entry becomes exactly 0 (x − x); scale: the first entry is kept
    rescaled = (sqrt_alphas_cumprod - last) * (first / (first - last))
    alphas_cumprod = rescaled**2
    alphas = np.append(alphas_cumprod[0], alphas_cumprod[1:] / alphas_cumprod[:-1])
    return 1.0 - alphas


_SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
}


def get_named_beta_schedule(
    schedule_name: str, num_diffusion_timesteps: int, zero_terminal_snr: bool = False
) -> np.ndarray:
    """The betas of a named schedule, float64, shape (T,).

    :param schedule_name: ``"linear"`` (Ho et al.) or ``"cosine"`` (IDDPM eq. 17).
    :param num_diffusion_timesteps: T, a positive integer.
    :param zero_terminal_snr: rescale to ᾱ_T = 0 (Lin et al. 2023, Alg. 1; see
        ``rescale_zero_terminal_snr``); needs ``model_mean_type`` v or start_x.
    """
    if schedule_name not in _SCHEDULES:
        raise ValueError(
            f"unknown beta schedule {schedule_name!r}; valid names: {sorted(_SCHEDULES)}"
        )
    if (
        isinstance(num_diffusion_timesteps, bool)
        or int(num_diffusion_timesteps) != num_diffusion_timesteps
        or num_diffusion_timesteps < 1
    ):
        raise ValueError(
            f"num_diffusion_timesteps must be a positive integer, got {num_diffusion_timesteps!r}"
        )
    if not isinstance(zero_terminal_snr, (bool, np.bool_)):
        raise ValueError(f"zero_terminal_snr must be true or false, got {zero_terminal_snr!r}")
    betas = _SCHEDULES[schedule_name](int(num_diffusion_timesteps))
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas
