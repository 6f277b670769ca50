"""Image editing with DDIM's deterministic map: inversion, slerp and SDEdit.

- `ddim_invert`: DDIM inversion (Song et al. 2020, arXiv 2010.02502, sec. 4.3 and 5.4):
  the η = 0 update of DDIM eq. 12 run upwards through the sampler's steps τ_0 < ... < τ_{N−1},

      x_{τ_i} = √ᾱ_{τ_i} x̂_0(x_{τ_{i−1}}) + √(1 − ᾱ_{τ_i}) ε̂(x_{τ_{i−1}}),

  with x̂_0 and ε̂ the model's predictions at the current point (the process's
  ``ddim_reverse_sample``). The first step leaves the data itself (ᾱ = 1, where x̂_0 = x_0
  and ε̂ is read at τ_0, the lowest step the model is called at); N model calls in all,
  as many as decoding with the same sampler takes. Decoding is the sampler itself:
  ``sampler(diffusion, model, noise=x_T)``.
- `slerp`: spherical interpolation between two latents (Shoemake 1985; DDIM sec. 5.3, Fig. 6).
- `sdedit`: SDEdit (Meng et al. 2022, arXiv 2108.01073, Algorithm 1): noise the input to
  t_0 = s·(T − 1) with q(x_{t_0} | x_0) (DDPM eq. 4) and denoise it with the sampler's DDIM
  steps at or below t_0.

``diffusion`` is always the BASE process of the checkpoint; the DDIM sampler respaces it
(`Sampler.respaced`), so these functions visit exactly the steps that sampling visits.

Class-conditional models take their labels as ``model_kwargs["y"]``, and the sampler's
``guidance_scale`` applies here as in sampling (`diffusion.sampling.guidance`, with the null
label in ``model_kwargs``): inversion then runs the guided ε̃ upwards and decoding runs it
back down. Inversion reads ε̂ at the point it leaves, where decoding reads it at the point it
arrives at; guidance multiplies the conditional-minus-unconditional part of ε̂ by w, and with
it that mismatch, so the reconstruction error grows with w (Mokady et al. 2022, arXiv
2211.09794, sec. 3). w = 1 (or null) inverts the conditional model itself, with the error of
unconditional inversion.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusion.process._tensor import extract_into_tensor
from diffusion.process.respace import respace
from diffusion.sampling.ddim import DDIMSampler
from diffusion.sampling.guidance import apply_guidance


def _check_ddim(sampler, *, deterministic: bool) -> None:
    if not isinstance(sampler, DDIMSampler):
        raise ValueError(f"editing needs a DDIM sampler (sampler=ddim50, ddim20, ...), got {type(sampler).__name__}")
    if deterministic and sampler.eta != 0:
        raise ValueError(f"DDIM inversion is the deterministic map: sampler.eta={sampler.eta} must be 0")


def _steps(indices, progress: bool | Callable):
    if callable(progress):
        return progress(indices)
    if progress:
        from tqdm.auto import tqdm  # lazy: tqdm is optional

        return tqdm(indices)
    return indices


def ddim_invert(diffusion, model, x_start: torch.Tensor, sampler: DDIMSampler, *,
                clip_denoised: bool = True, model_kwargs: dict | None = None,
                progress: bool | Callable = False) -> torch.Tensor:
    """x_T for the images ``x_start`` (N, C, H, W) in [-1, 1]: DDIM eq. 12 with η = 0 run from
    t = 0 up to the sampler's last step (see the module doc). Decoding the result with the
    same ``sampler`` returns ``x_start`` up to the discretisation error of its step count."""
    _check_ddim(sampler, deterministic=True)
    process = sampler.respaced(diffusion)  # respaced index i is the original step τ_i
    model, model_kwargs = apply_guidance(model, model_kwargs, sampler.guidance_scale)
    x = x_start
    with torch.no_grad():
        x = _first_step(process, model, x, clip_denoised, model_kwargs)
        for i in _steps(range(process.num_timesteps - 1), progress):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            x = process.ddim_reverse_sample(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)["sample"]
    return x


def _first_step(process, model, x_start, clip_denoised, model_kwargs) -> torch.Tensor:
    """x_{τ_0} = √ᾱ_{τ_0} x_0 + √(1 − ᾱ_{τ_0}) ε̂(x_0, τ_0): the step out of the data (ᾱ = 1),
    where x̂_0 is the input itself and ε̂ is read at the lowest step, τ_0."""
    t = torch.zeros(x_start.shape[0], dtype=torch.long, device=x_start.device)
    out = process.p_mean_variance(model, x_start, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    eps = process._predict_eps_from_xstart(x_start, t, out["pred_xstart"])
    alpha_bar = extract_into_tensor(process.alphas_cumprod, t, x_start)
    return torch.sqrt(alpha_bar) * x_start + torch.sqrt(1 - alpha_bar) * eps


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per example (DDIM sec. 5.3): with θ = arccos(⟨z0, z1⟩ / (|z0| |z1|)),

        slerp(z0, z1, α) = sin((1 − α) θ)/sin θ · z0 + sin(α θ)/sin θ · z1,

    z0 at α = 0, z1 at α = 1; parallel latents (sin θ ≈ 0) fall back to the straight line."""
    if z0.shape != z1.shape:
        raise ValueError(f"slerp needs latents of one shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    flat0, flat1 = z0.flatten(1), z1.flatten(1)  # (B, C, H, W) -> (B, CHW)
    cos = (flat0 * flat1).sum(1) / (flat0.norm(dim=1) * flat1.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1)).view(-1, *([1] * (z0.ndim - 1)))  # (B,) -> (B, 1, 1, 1)
    alpha = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device)
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-6  # sin θ → 0: the weights tend to (1 − α, α)
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    w0 = torch.where(parallel, 1 - alpha, torch.sin((1 - alpha) * theta) / safe)
    w1 = torch.where(parallel, alpha, torch.sin(alpha * theta) / safe)
    return w0 * z0 + w1 * z1


def slerp_row(z0: torch.Tensor, z1: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` latents evenly spaced in α from z0 to z1 (both (C, H, W)): (count, C, H, W)."""
    if count < 2:
        raise ValueError(f"an interpolation row needs at least 2 images, got {count}")
    alphas = torch.linspace(0, 1, count, dtype=z0.dtype, device=z0.device).view(-1, 1, 1, 1)
    return slerp(z0.expand(count, *z0.shape), z1.expand(count, *z1.shape), alphas)


def sdedit_start_step(num_timesteps: int, strength: float) -> int:
    """t_0 = s·(T − 1), rounded to the nearest step (Meng et al. 2022, sec. 3)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength!r} must be in [0, 1] (0 returns the input, 1 samples from noise)")
    return round(strength * (num_timesteps - 1))


def sdedit(diffusion, model, x_start: torch.Tensor, strength: float, sampler: DDIMSampler, *,
           noise: torch.Tensor, clip_denoised: bool = True, model_kwargs: dict | None = None,
           generator: torch.Generator | None = None, progress: bool | Callable = False) -> torch.Tensor:
    """SDEdit of ``x_start`` at ``strength`` s with the DDIM ``sampler`` (any η).

    The sampler's steps τ_i ≤ t_0 run from x_{τ_k} = √ᾱ_{τ_k} x_0 + √(1 − ᾱ_{τ_k}) ``noise``,
    τ_k the highest of them. The two ends are exact: s = 0 returns ``x_start`` (no noise, no
    step), and s = 1 is the sampler started from ``noise`` itself, as sampling treats x_T
    (the prior N(0, I) standing in for q(x_{T−1}), whose ᾱ is nearly 0).
    """
    _check_ddim(sampler, deterministic=False)
    t0 = sdedit_start_step(diffusion.num_timesteps, strength)
    if noise.shape != x_start.shape:
        raise ValueError(f"noise {tuple(noise.shape)} and x_start {tuple(x_start.shape)} differ")
    if strength == 0:
        return x_start.clone()
    kept = [t for t in sampler.timesteps(diffusion.num_timesteps) if t <= t0]
    call = dict(clip_denoised=clip_denoised, model_kwargs=model_kwargs, progress=progress)
    if strength == 1:
        return sampler(diffusion, model, noise=noise, generator=generator, **call)
    if not kept:  # t_0 below the sampler's first step: nothing to denoise
        return x_start.clone()
    t_top = torch.full((x_start.shape[0],), kept[-1], dtype=torch.long, device=x_start.device)
    x_t = diffusion.q_sample(x_start, t_top, noise=noise)
    process = respace(diffusion, kept)  # the same DDIM steps as the sampler's, cut at t_0
    model, call["model_kwargs"] = apply_guidance(model, model_kwargs, sampler.guidance_scale)
    return process.ddim_sample_loop(model, tuple(x_t.shape), noise=x_t, eta=sampler.eta,
                                    device=x_t.device, generator=generator, **call)
