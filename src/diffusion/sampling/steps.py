"""Which steps of a T-step process a sampler visits (the respacing rules).

Every function returns the kept ORIGINAL step indices, 0-based and ascending, ready for
``SpacedDiffusion(use_timesteps, ...)``. None of them ever returns a different number of
steps from the one asked for: where a rule cannot give exactly N steps it raises.

| rule | source | kept indices for N steps out of T |
|---|---|---|
| evenly spaced | IDDPM sec. 4 (arXiv 2102.09672) | ``space_timesteps(T, [N])``: N evenly spaced reals in [0, T-1], rounded as improved-diffusion does |
| uniform skip | DDIM App. D.2 (arXiv 2010.02502) | ``range(0, T, k)``, k the smallest stride with exactly N entries |
| quadratic skip | DDIM App. D.2 | ``floor((i * sqrt(0.8 T) / (N-1))^2)``, i = 0..N-1 |
| trailing | Lin et al. 2023, Table 2 (arXiv 2305.08891) | ``round(T - i T/N) - 1``, i = 0..N-1: from T-1 down |
| section counts | improved-diffusion ``timestep_respacing`` | ``space_timesteps(T, "a,b,c")`` |

The uniform skip: the DDIM authors' code takes ``k = T // N`` and keeps ``range(0, T, k)``,
which has MORE than N entries when N does not divide T (T=1000, N=30: k=33, 31 steps;
T=100, N=60: k=1, all 100 steps). We keep the rule ``range(0, T, k)`` but pick the stride
that gives exactly N entries, ``k = ceil(T / N)``; when N divides T this is DDIM's
``T // N``, and in every case it is improved-diffusion's ``"ddimN"`` respacing, so models
from either codebase give their own numbers here. When no integer stride gives N steps,
this is an error that points to the rules that can (section counts, quadratic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from diffusion.process.respace import normalize_section_counts, space_timesteps


def check_steps(steps: int, num_timesteps: int | None = None) -> None:
    """Raise ValueError unless ``steps`` is an int with ``1 <= steps <= num_timesteps``
    (no upper bound when ``num_timesteps`` is None: the sampler is built before T is known)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if num_timesteps is not None and steps > num_timesteps:
        raise ValueError(
            f"sampler asks for {steps} steps but the process has only {num_timesteps}"
        )


def check_step_choice(owner: str, steps: int | None, respacing) -> str | None:
    """Validate a sampler's ``steps`` / ``respacing`` pair (they are alternatives) and
    return the respacing normalised to a section-count string."""
    respacing = normalize_respacing(respacing)
    if steps is not None and respacing is not None:
        raise ValueError(
            f"{owner} got steps={steps} and respacing={respacing!r}; they are alternatives: "
            f"pass steps=None (sampler.steps=null) to use the respacing"
        )
    if steps is not None:
        check_steps(steps)
    return respacing


def chosen_timesteps(num_timesteps: int, steps: int | None, respacing: str | None,
                     rule: Callable[[int, int], list[int]]) -> list[int]:
    """The kept steps: the section counts if given, else ``rule(T, steps)``, else all T."""
    if respacing is not None:
        return section_timesteps(num_timesteps, respacing)
    if steps is None:
        return all_timesteps(num_timesteps)
    return rule(num_timesteps, steps)


def all_timesteps(num_timesteps: int) -> list[int]:
    """Every step of the process: ancestral sampling as trained (DDPM Alg. 2)."""
    return list(range(num_timesteps))


def evenly_spaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """IDDPM sec. 4 respacing: ``steps`` evenly spaced reals from the first to the last
    step, rounded to integers (improved-diffusion's ``timestep_respacing="N"``)."""
    check_steps(steps, num_timesteps)
    return sorted(space_timesteps(num_timesteps, [int(steps)]))


def uniform_skip_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """DDIM App. D.2 uniform ("linear") τ: ``range(0, T, k)`` with exactly ``steps`` entries.

    ``len(range(0, T, k)) == ceil(T / k)`` falls as k grows, so the smallest k with at most
    N entries is ``ceil(T / N)``; if that one has fewer than N, no integer stride has N.
    """
    check_steps(steps, num_timesteps)
    stride = math.ceil(num_timesteps / steps)
    kept = list(range(0, num_timesteps, stride))
    if len(kept) != steps:
        raise ValueError(
            f"uniform skip: no integer stride keeps exactly {steps} of {num_timesteps} "
            f"steps (stride {stride} keeps {len(kept)}, stride {stride - 1} keeps "
            f"{len(range(0, num_timesteps, stride - 1))}); use skip='quadratic' or "
            f"respacing='{steps}' (evenly spaced, rounded) instead"
        )
    return kept


def trailing_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Lin et al. 2023 (arXiv 2305.08891, sec. 3.3, Table 2) "trailing": round(T − i T/N) − 1,
    i = 0..N-1, so that sampling starts at the last step T − 1 (where the noise x_T is what
    the model was trained on) and the last call is at T/N − 1, not at t = 0."""
    check_steps(steps, num_timesteps)
    return sorted(int(t) for t in trailing_offsets(num_timesteps, steps))


def trailing_offsets(span: float, steps: int) -> np.ndarray:
    """round(S − i S/N) − 1 for i = 0..N-1, descending: the trailing steps over S steps
    (Lin et al. 2023, Table 2; also the σ samplers' ``trailing`` grid, over a capped range)."""
    return np.round(span - np.arange(steps) * span / steps) - 1.0


def quadratic_skip_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """DDIM App. D.2 quadratic τ_i = floor(c i²), i = 0..N-1, with c set so that the last
    step is 0.8 T (the constant in the DDIM authors' code; used there for CIFAR-10).

    At small T the first few values coincide after the floor; that is an error, since the
    sampler would then take fewer steps than asked for.
    """
    check_steps(steps, num_timesteps)
    # τ_i = (i * sqrt(0.8 T) / (N-1))², truncated toward zero as in the reference code.
    kept = (np.linspace(0.0, math.sqrt(num_timesteps * 0.8), steps) ** 2).astype(np.int64)
    if len(np.unique(kept)) != steps:
        first_dup = int(kept[np.flatnonzero(np.diff(kept) == 0)[0]])
        raise ValueError(
            f"quadratic skip: {steps} steps out of {num_timesteps} repeat step {first_dup} "
            f"(floor(c i²) is not injective this close to t=0); ask for fewer steps, a "
            f"longer process, or skip='uniform'"
        )
    return [int(t) for t in kept]


def section_timesteps(num_timesteps: int, respacing: str) -> list[int]:
    """improved-diffusion's section counts: ``"10,15,20"`` splits the T steps into three
    equal sections and keeps 10, 15 and 20 evenly spaced steps from them (``"ddimN"`` is
    also accepted, meaning the uniform skip)."""
    return sorted(int(t) for t in space_timesteps(num_timesteps, respacing))


def normalize_respacing(respacing: str | int | Sequence[int] | None) -> str | None:
    """A respacing as the canonical string ``"a,b,c"`` (or ``"ddimN"``), or None for none;
    the rules are ``process.respace.normalize_section_counts``'s."""
    if respacing is None:
        return None
    return normalize_section_counts(respacing, "respacing")
