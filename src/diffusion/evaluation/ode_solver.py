"""An adaptive Dormand–Prince RK5(4) solver in torch, for the probability-flow likelihood.

Dormand & Prince 1980 ("A family of embedded Runge-Kutta formulae", J. Comp. Appl. Math.
6(1)), the RK45 of scipy's ``solve_ivp`` and of Song et al. 2021's likelihood code (arXiv
2011.13456, App. D.2): seven stages, the 5th-order solution propagated, the embedded
4th-order one for the error estimate, first-same-as-last (six evaluations per step), the
step size control and the starting step of Hairer, Nørsett & Wanner, "Solving ODEs I",
sec. II.4.

Why our own and not ``scipy.integrate.solve_ivp``: the state stays on the network's device
(a GPU batch would otherwise cross to the host and back at every evaluation) and in its
dtype (float64 for the closed-form tests); scipy is not a declared dependency either. Like
``solve_ivp`` on a flattened batch, one step size serves the whole batch, whose error is
the RMS over every component of the state (``norm``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# The Butcher tableau (Hairer, Nørsett & Wanner, Table II.5.2): C nodes, A stages, B the
# 5th-order weights (= A's last row, FSAL), E = B − B̂ with B̂ the embedded 4th-order weights.
C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0  # as scipy's RK45
MAX_STEPS = 10_000


def norm(v: torch.Tensor) -> float:
    """RMS over every component (Hairer II.4, eq. 4.11)."""
    return float(v.double().pow(2).mean().sqrt())


def initial_step(fn, t0: float, y0, f0, direction: float, rtol: float, atol: float) -> float:
    """Hairer II.4's starting step: h0 from the sizes of y0 and f0, then a 5th-order
    estimate from one Euler step (one more evaluation)."""
    scale = atol + rtol * y0.abs()
    d0, d1 = norm(y0 / scale), norm(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = fn(t0 + direction * h0, y0 + direction * h0 * f0)
    d2 = norm((f1 - f0) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1)


def dopri5_step(fn, t: float, y, k1, h: float):
    """One step of size h (signed): the 5th-order y_new, its slope (the next k1) and the
    error estimate y_new − ŷ_new."""
    ks = [k1]
    for c, a in zip(C[1:], A[1:], strict=True):
        y_stage = y + h * sum(a_j * k_j for a_j, k_j in zip(a, ks, strict=True) if a_j)
        ks.append(fn(t + c * h, y_stage))
    # the last stage is evaluated at the 5th-order solution itself (FSAL)
    error = h * sum(e * k for e, k in zip(E, ks, strict=True) if e)
    return y_stage, ks[-1], error


def dopri5(fn: Callable[[float, torch.Tensor], torch.Tensor], y0: torch.Tensor, t0: float, t1: float,
           rtol: float = 1e-5, atol: float = 1e-5) -> tuple[torch.Tensor, int]:
    """y(t1) for dy/dt = fn(t, y), y(t0) = y0, within the tolerances; returns (y(t1), the
    number of evaluations of ``fn``). A step is kept when the RMS of error/(atol + rtol·|y|)
    is at most 1."""
    direction = 1.0 if t1 >= t0 else -1.0
    t, y = float(t0), y0
    f = fn(t, y)
    h = initial_step(fn, t, y, f, direction, rtol, atol)
    nfe = 2
    for _ in range(MAX_STEPS):
        if direction * (t1 - t) <= 0:
            return y, nfe
        h = min(h, abs(t1 - t))
        last = h == abs(t1 - t)
        y_new, f_new, error = dopri5_step(fn, t, y, f, direction * h)
        nfe += 6
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        err = norm(error / scale)
        factor = MAX_FACTOR if err == 0 else min(MAX_FACTOR, max(MIN_FACTOR, SAFETY * err ** (-1 / 5)))
        if err <= 1:
            t, y, f = (float(t1) if last else t + direction * h), y_new, f_new
        h *= factor if err <= 1 else min(1.0, factor)
    raise RuntimeError(f"dopri5 took {MAX_STEPS} steps from t={t0} to {t1} without arriving (stopped at "
                       f"t={t}): loosen ode_rtol/ode_atol")
