"""A cheap, unbiased estimate of the variational bound, for validation during training.

The bound (DDPM eq. 5) is L = L_T + Σ_{t=1}^{T-1} L_t + L_0 in bits/dim; `calc_bpd_loop`
evaluates all T terms, one network call each. Here L_T (no network) and the decoder term
L_0 are exact, and the middle sum is estimated from ONE term per image by stratified
importance sampling: t ~ q(t) ∝ 1/t on {1, ..., T-1}, each image of a batch drawn from its
own stratum of q's quantiles, weighted by 1/q(t). The terms fall off roughly as 1/t (they
are largest near the data), so q nearly matches them and the estimate is unbiased with a
small variance: for the 8x8 digits at T = 1000, a standard deviation of about 0.01 bits/dim
over 180 images, against about 3 bits/dim for uniform t.
"""

from __future__ import annotations

import numpy as np
import torch

from diffusion.process._tensor import randn


def harmonic_proposal(num_timesteps: int) -> np.ndarray:
    """q(t) ∝ 1/t on t = 1..T-1 (float64, shape (T-1,), index 0 is t = 1)."""
    q = 1.0 / np.arange(1, num_timesteps, dtype=np.float64)
    return q / q.sum()


def stratified_timesteps(
    batch_size: int, num_timesteps: int, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """t in {1..T-1} for each of ``batch_size`` images, one per quantile stratum of q, and
    the importance weights 1/q(t), so that E[mean_i w_i L_{t_i}] = Σ_{t=1}^{T-1} L_t."""
    q = harmonic_proposal(num_timesteps)
    cdf = np.cumsum(q)
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    u = (torch.arange(batch_size, dtype=torch.float64) + u) / batch_size  # one per stratum
    index = np.minimum(np.searchsorted(cdf, u.numpy(), side="right"), num_timesteps - 2)
    t = torch.from_numpy(index + 1).to(device=device, dtype=torch.long)
    weights = torch.from_numpy(1.0 / q[index]).to(device)
    return t, weights


def estimate_bpd(
    diffusion, model, x_start: torch.Tensor, *, clip_denoised: bool = True,
    model_kwargs: dict | None = None, generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image unbiased estimate of the bound in bits/dim, with two network calls.

    ``generator`` is a CPU generator (the draws are made on the CPU and moved), so the
    estimate is the same on any device for a given seed.
    Returns ``total_bpd``, ``prior_bpd``, ``decoder_bpd`` and ``middle_bpd`` (each (B,)).
    """
    batch = x_start.shape[0]
    if diffusion.num_timesteps < 2:
        raise ValueError("estimate_bpd needs a process of at least 2 steps")
    t, weights = stratified_timesteps(batch, diffusion.num_timesteps, generator, x_start.device)
    zeros = torch.zeros(batch, dtype=torch.long, device=x_start.device)
    terms = {}
    for name, steps in (("decoder_bpd", zeros), ("middle_bpd", t)):
        # drawn in the default float type, then cast: float32 and float64 runs see one noise
        noise = randn(x_start.shape, generator, device=x_start.device).to(x_start.dtype)
        x_t = diffusion.q_sample(x_start, steps, noise=noise)
        terms[name] = diffusion._vb_terms_bpd(
            model, x_start, x_t, steps, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )["output"]
    terms["middle_bpd"] = terms["middle_bpd"] * weights.to(terms["middle_bpd"].dtype)
    terms["prior_bpd"] = diffusion._prior_bpd(x_start)
    terms["total_bpd"] = terms["prior_bpd"] + terms["decoder_bpd"] + terms["middle_bpd"]
    return terms
