"""Inpainting with RePaint (Lugmayr et al. 2022, arXiv 2201.09865) on ancestral (DDPM) steps.

Masks are 1 where the pixel is KNOWN (kept from the input) and 0 where it is to be FILLED.
With the DDPM sampler's steps τ_0 < ... < τ_{N−1} (possibly respaced, `Sampler.respaced`),
state i is x_{τ_i} and state −1 is the data. One reverse step from state i (Alg. 1):

    x^known_{i−1}   ~ q(x_{τ_{i−1}} | x_0)       the input noised to the step below (DDPM eq. 4);
                                                 the input itself at state −1 (t = 0, no noise)
    x^unknown_{i−1} ~ p_θ(x_{τ_{i−1}} | x_{τ_i}) the model's ancestral step (`p_sample`)
    x_{i−1}         = m ⊙ x^known + (1 − m) ⊙ x^unknown

so the known region of the output is the input exactly. A resampling step goes back up
one step with the forward process, x_i ~ q(x_i | x_{i−1}) = N(√(1 − β_i) x_{i−1}, β_i I),
β_i the respaced process's β (1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}}). The order of the steps is the
paper's "jumps" schedule (sec. 4.2, `resampling_schedule`): after reaching a state that is
a multiple of the jump length j, go back up j steps, r − 1 times; r = 1 (``jump_n_sample``)
is plain ancestral sampling with the known region pasted in.

Randomness comes from ``generator`` in this order: x_T, then per reverse step the known
region's noise (only when the mask has a known pixel), then the model step's noise; per
forward step its noise. With an all-zeros mask and r = 1 the draws are exactly those of
`DDPMSampler`, and so is the result.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from diffusion.process._tensor import extract_into_tensor, randn, randn_like
from diffusion.sampling.ddpm import DDPMSampler
from diffusion.sampling.guidance import apply_guidance
from diffusion.sampling.inversion import _steps

MASKS = ("half", "center", "strokes")


def resampling_schedule(num_steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """The states visited, from N − 1 (x_T) down to −1 (the data), of RePaint's jumps
    schedule (sec. 4.2; the authors' ``get_schedule_jump``): at each state j·k < N − j
    reached on the way down the walk goes back up ``jump_length`` states, ``jump_n_sample``
    − 1 times. A step to a lower state is a reverse step, to a higher one a forward step.

    >>> resampling_schedule(5, jump_length=2, jump_n_sample=2)
    [4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    """
    for name, value in (("num_steps", num_steps), ("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    t, states = num_steps - 1, [num_steps - 1]
    while t >= 0:
        t -= 1
        states.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                states.append(t)
    return states


def model_calls(states: list[int]) -> int:
    """The reverse steps (one model call each) of a ``resampling_schedule``."""
    return sum(there < here for here, there in itertools.pairwise(states))


# ------------------------------------------------------------------------------- masks
def builtin_mask(name: str, height: int, width: int, count: int = 1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A (count, 1, H, W) float mask, 1 = known, 0 = to fill:

    - ``half``: the left half (columns < W/2) known, the right half filled;
    - ``center``: the centred box of half the height and half the width filled;
    - ``strokes``: 4 random brush strokes per image filled, drawn from ``generator``.
    """
    if name not in MASKS:
        raise ValueError(f"mask={name!r} is not one of {', '.join(MASKS)}, nor a .png or .npy file")
    mask = torch.ones(count, 1, height, width)
    if name == "half":
        mask[..., width // 2:] = 0
    elif name == "center":
        top, left = height // 4, width // 4
        mask[..., top:top + (height + 1) // 2, left:left + (width + 1) // 2] = 0
    else:
        mask = torch.stack([_strokes(height, width, generator) for _ in range(count)])
    return mask


def _strokes(height: int, width: int, generator, count: int = 4, vertices: int = 4) -> torch.Tensor:
    """(1, H, W): ``count`` polylines of ``vertices`` points (a random walk from a uniform
    start, steps of up to a third of the side) painted 0 with a brush of radius ≈ side/16."""
    device = generator.device if generator is not None else torch.device("cpu")
    size = min(height, width)
    radius = max(0.75, size / 16)
    rows = torch.arange(height, dtype=torch.float64, device=device).view(-1, 1).expand(height, width)
    cols = torch.arange(width, dtype=torch.float64, device=device).view(1, -1).expand(height, width)
    pixels = torch.stack([rows, cols], dim=-1)  # (H, W, 2)
    keep = torch.ones(height, width, dtype=torch.bool, device=device)
    scale = torch.tensor([height - 1, width - 1], dtype=torch.float64, device=device)
    for _ in range(count):
        uniform = torch.rand(vertices * 2 + 1, generator=generator, dtype=torch.float64, device=device)
        point = uniform[:2] * scale
        for k in range(vertices - 1):
            angle = 2 * math.pi * uniform[2 + 2 * k]
            length = uniform[3 + 2 * k] * size / 3
            end = (point + length * torch.stack([torch.sin(angle), torch.cos(angle)])).clamp(min=0).minimum(scale)
            keep &= _distance_to_segment(pixels, point, end) > radius
            point = end
    return keep.to(torch.get_default_dtype()).cpu().unsqueeze(0)


def _distance_to_segment(pixels: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of each (H, W, 2) pixel to the segment from a to b: (H, W)."""
    ab = b - a
    along = ((pixels - a) @ ab / (ab @ ab).clamp(min=1e-12)).clamp(0, 1)
    return (pixels - a - along.unsqueeze(-1) * ab).norm(dim=-1)


# ---------------------------------------------------------------------------- inpaint
def repaint(diffusion, model, x_start: torch.Tensor, mask: torch.Tensor, sampler: DDPMSampler, *,
            jump_length: int = 10, jump_n_sample: int = 10, noise: torch.Tensor | None = None,
            clip_denoised: bool = True, model_kwargs: dict | None = None,
            generator: torch.Generator | None = None, progress: bool | Callable = False) -> torch.Tensor:
    """Fill the 0 region of ``mask`` in ``x_start`` (N, C, H, W) with RePaint (module doc).

    ``diffusion`` is the base process; ``sampler`` (a DDPM sampler) chooses the steps and
    the guidance. ``mask`` broadcasts against ``x_start`` ((H, W), (N, 1, H, W), ...) and
    holds only 0 and 1. ``noise``: x_T (default: drawn from ``generator``). Model calls:
    the reverse steps of ``resampling_schedule(N, jump_length, jump_n_sample)``.
    """
    if not isinstance(sampler, DDPMSampler):
        raise ValueError(f"RePaint runs ancestral steps: pass a DDPM sampler (sampler=ddpm sampler.steps=250), "
                         f"got {type(sampler).__name__}")
    mask = torch.as_tensor(mask, device=x_start.device)
    try:
        known = torch.broadcast_to(mask, x_start.shape) != 0
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast against the images "
                         f"{tuple(x_start.shape)}") from None
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask holds values other than 0 and 1 (1 = known, 0 = to fill)")
    process = sampler.respaced(diffusion)
    states = resampling_schedule(process.num_timesteps, jump_length, jump_n_sample)
    x = noise if noise is not None else randn(x_start.shape, generator, dtype=x_start.dtype, device=x_start.device)
    if tuple(x.shape) != tuple(x_start.shape):
        raise ValueError(f"noise {tuple(x.shape)} and x_start {tuple(x_start.shape)} differ")
    model, model_kwargs = apply_guidance(model, model_kwargs, sampler.guidance_scale)
    any_known = bool(known.any())
    batch = x_start.shape[0]
    with torch.no_grad():
        for here, there in _steps(list(itertools.pairwise(states)), progress):
            if there > here:  # resampling: x_{here+1} ~ q(x_{here+1} | x_here)
                beta = extract_into_tensor(process.betas, torch.full((batch,), there, dtype=torch.long,
                                                                     device=x.device), x)
                x = torch.sqrt(1 - beta) * x + torch.sqrt(beta) * randn_like(x, generator)
                continue
            t = torch.full((batch,), here, dtype=torch.long, device=x.device)
            x_known = x_start
            if there >= 0 and any_known:
                t_known = torch.full((batch,), there, dtype=torch.long, device=x.device)
                x_known = process.q_sample(x_start, t_known, noise=randn_like(x, generator))
            x_unknown = process.p_sample(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                                         generator=generator)["sample"]
            x = torch.where(known, x_known.to(x_unknown.dtype), x_unknown)
    return x
