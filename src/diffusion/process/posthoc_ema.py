"""Power-function EMA profiles and post-hoc EMA reconstruction (EDM2: Karras et al. 2024,
"Analyzing and Improving the Training Dynamics of Diffusion Models", arXiv 2312.02696,
sec. 3 and App. C).

A power-function EMA averages the weights θ_τ of steps τ ≤ t with the profile

    p_γ,t(τ) = (γ + 1) τ^γ / t^(γ+1)   on 0 < τ ≤ t   (0 after t),

whose length scales with the training run, so one γ means the same thing at every step.
Its width is given as σ_rel, the profile's standard deviation divided by t (sec. 3.1).
During training the average follows θ̂_t = β_t θ̂_{t-1} + (1 - β_t) θ_t with
β_t = (1 - 1/t)^(γ+1) (`power_beta`), which gives step τ the weight
(τ^(γ+1) - (τ-1)^(γ+1)) / t^(γ+1) = ∫_{τ-1}^{τ} p_γ,t: the profile, integrated over each
step, exactly. Snapshots of a few such averages at steps t_i are enough to build the
average of any other γ afterwards: the combination Σ_i x_i p_γi,ti closest to the target
profile in L2 solves the normal equations A x = b with A_ij = ⟨p_i, p_j⟩ and
b_i = ⟨p_i, p_target⟩, inner products in closed form (App. C.3, `profile_inner_products`).

Pure math: numpy and torch, no file, no Lightning, no Hydra. The snapshots on disk are
`diffusion.checkpoint`'s; the callback that writes them is `diffusion.training.posthoc_ema`.

Notation:

    ======================  ======================================================
    code                    paper (EDM2, arXiv 2312.02696)
    ======================  ======================================================
    ``gamma``               γ, the exponent of the power-function profile
    ``std``                 σ_rel, the profile's std relative to its length t
    ``step``                t, optimizer steps taken (1 after the first)
    ``steps``, ``gammas``   t_i, γ_i of the snapshots
    ``coefficients``        x, the weights of the snapshots in the reconstruction
    ======================  ======================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch


def std_from_gamma(gamma: float) -> float:
    """σ_rel of the profile of exponent γ > -1: σ_rel = √(γ+1) / ((γ+2) √(γ+3)).

    EDM2 sec. 3.1 and App. C.2, eq. 123 (arXiv 2312.02696): the profile has mean
    t (γ+1)/(γ+2) and second moment t² (γ+1)/(γ+3), so its variance is
    t² (γ+1) / ((γ+2)² (γ+3)).
    """
    if not gamma > -1:
        raise ValueError(f"gamma={gamma!r} must be a number > -1 (the profile is not integrable otherwise)")
    return math.sqrt((gamma + 1) / ((gamma + 3) * (gamma + 2) ** 2))


# γ = 0 is the plain average of every step so far (σ_rel = 1/√12 = 0.2887). Wider profiles
# exist (down to γ = (√5 - 3)/2, σ_rel = 0.3003) but weight early steps more than late ones.
STD_MAX = std_from_gamma(0.0)


def gamma_from_std(std: float) -> float:
    """The exponent γ of the profile whose relative std is ``std`` = σ_rel: EDM2's
    eq. 123 (App. C.2, arXiv 2312.02696) solved for γ as the paper does (eq. 126, Algorithm 2).

    Squaring eq. 3 and multiplying out, σ_rel² (γ+2)² (γ+3) = γ+1 is the cubic

        γ³ + 7γ² + (16 - σ_rel⁻²) γ + (12 - σ_rel⁻²) = 0,

    whose largest real root is γ (σ_rel = 0.05 -> γ = 16.97, σ_rel = 0.10 -> γ = 6.94).
    Raises ValueError for a σ_rel outside (0, `STD_MAX`] (γ ≥ 0).
    """
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std <= STD_MAX:
        raise ValueError(f"std={std!r} is not the σ_rel of a power-function EMA: it must be a number in "
                         f"(0, {STD_MAX:.4f}], e.g. 0.05 or 0.1")
    inverse_square = float(std) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inverse_square, 12.0 - inverse_square])
    return max(0.0, float(roots.real.max()))  # at STD_MAX the root is 0, up to rounding


def check_stds(stds: Any) -> tuple[float, ...]:
    """``stds`` (a σ_rel or a sequence of them) as a tuple of distinct σ_rel values that
    power-function profiles have; ValueError naming the value and the fix otherwise."""
    values = [stds] if isinstance(stds, (int, float)) and not isinstance(stds, bool) else stds
    fix = f"give distinct σ_rel values in (0, {STD_MAX:.4f}], e.g. [0.05,0.1]"
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"stds={stds!r} must be a list of σ_rel values; {fix}")
    for std in values:
        try:
            gamma_from_std(std)
        except ValueError:
            raise ValueError(f"stds={list(values)}: {std!r} is not the σ_rel of a power-function EMA; "
                             f"{fix}") from None
    if len({f"{float(s):g}" for s in values}) != len(values):
        raise ValueError(f"stds={list(values)} repeats a value; {fix}")
    return tuple(float(s) for s in values)


def power_beta(step: int, gamma: float) -> float:
    """β_t = (1 - 1/t)^(γ+1), the decay after optimizer step t ≥ 1 (EDM2 sec. 3.1 and
    App. C.2, eq. 127; 0 at t = 1, where the average becomes the weights)."""
    if step < 1:
        raise ValueError(f"step={step!r} must be >= 1 (the first optimizer step is 1)")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_products(steps_a: Sequence[float], gammas_a: Sequence[float],
                           steps_b: Sequence[float], gammas_b: Sequence[float]) -> np.ndarray:
    """⟨p_a, p_b⟩ = ∫ p_γa,ta(τ) p_γb,tb(τ) dτ for every pair, a matrix (len(a), len(b)).

    EDM2 App. C.3 (eq. 151, Algorithm 3): over 0 < τ ≤ m = min(ta, tb),
    (γa+1)(γb+1) m^(γa+γb+1) / ((γa+γb+1) ta^(γa+1) tb^(γb+1)), written here as
    (γa+1)(γb+1)/(γa+γb+1) · (m/M)^γ_M / M with M = max(ta, tb) and γ_M the exponent of
    the profile that runs to M, so that no power of t overflows.
    """
    ta, ga = np.asarray(steps_a, np.float64)[:, None], np.asarray(gammas_a, np.float64)[:, None]  # (A, 1)
    tb, gb = np.asarray(steps_b, np.float64)[None, :], np.asarray(gammas_b, np.float64)[None, :]  # (1, B)
    shorter, longer = np.minimum(ta, tb), np.maximum(ta, tb)  # (A, B)
    gamma_longer = np.where(ta <= tb, gb, ga)  # (A, B)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * (shorter / longer) ** gamma_longer / longer


def solve_coefficients(steps: Sequence[int], gammas: Sequence[float], target_gamma: float,
                       target_step: float | None = None) -> np.ndarray:
    """The weights x of the snapshots (steps t_i, exponents γ_i) whose combination
    Σ_i x_i p_γi,ti is closest in L2 to the profile of ``target_gamma`` at ``target_step``
    (default: the last snapshot's step): A x = b (EDM2 App. C.3, Algorithm 3).

    x is scaled to sum to 1, as EDM2 does, so that weights that never moved come back
    unchanged (the least-squares x sums to 1 only approximately). Shape (len(steps),).
    """
    if len(steps) != len(gammas) or not steps:
        raise ValueError(f"need one gamma per snapshot step and at least one snapshot; got "
                         f"{len(steps)} steps and {len(gammas)} gammas")
    if min(steps) < 1:
        raise ValueError(f"snapshot steps must be >= 1; got {min(steps)}")
    target_step = max(steps) if target_step is None else target_step
    gram = profile_inner_products(steps, gammas, steps, gammas)  # A: (N, N)
    towards = profile_inner_products(steps, gammas, [target_step], [target_gamma])[:, 0]  # b: (N,)
    # lstsq, not solve: two snapshots with the same profile make A singular.
    coefficients = np.linalg.lstsq(gram, towards, rcond=None)[0]
    return coefficients / coefficients.sum()


def combine_state_dicts(states: Iterable[Mapping[str, torch.Tensor]],
                        coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_i x_i state_i for every floating-point tensor, accumulated in float64 and returned
    in each tensor's own dtype; other tensors (integer counters) are the last state's.
    ``states`` is consumed one at a time, so a lazy iterable holds one snapshot in memory."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    count = 0
    for count, (state, weight) in enumerate(zip(states, coefficients, strict=True), start=1):
        if count > 1 and set(state) != set(total):
            raise ValueError(f"state {count} has other keys than the first: {sorted(set(state) ^ set(total))[:3]}")
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                total[name], dtypes[name] = tensor.clone(), tensor.dtype
                continue
            term = tensor.detach().to(torch.float64) * float(weight)
            total[name] = term if count == 1 else total[name].add_(term)
            dtypes[name] = tensor.dtype
    if count == 0:
        raise ValueError("no state dicts to combine")
    return {name: tensor.to(dtypes[name]) for name, tensor in total.items()}
