"""Sinusoidal timestep embedding.

DDPM (Ho et al. 2020, arXiv 2006.11239, appendix B) tells the network the step ``t`` through
the Transformer's sinusoidal position embedding (Vaswani et al. 2017, arXiv 1706.03762,
sec. 3.5). For frequency index i in [0, half) with half = dim // 2,

    ω_i = max_period^(−i / half),   emb(t) = [cos(t ω_0), …, cos(t ω_{half−1}),
                                              sin(t ω_0), …, sin(t ω_{half−1})]

cosines first, then sines, as improved-diffusion lays them out, so that converted
checkpoints see the same features. ``t`` may be fractional: with ``rescale_timesteps`` the
process passes t·1000/T as floats.
"""

from __future__ import annotations

import math

import torch


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    max_period: float = 10000.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sinusoidal embedding of a batch of (possibly fractional) timesteps.

    Args:
        timesteps: (N,) tensor of step indices, integer or floating point.
        dim: width of the embedding; an odd width gets one zero column at the end.
        max_period: sets the lowest frequency, 1 / max_period.
        dtype: dtype of the result. The angles are computed in float32 (as improved-diffusion
            does, so converted models see bit-identical features) or in float64 when
            ``dtype`` is float64.

    Returns:
        (N, dim) tensor ``[cos(t ω), sin(t ω)]``.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor (N,), got shape {tuple(timesteps.shape)}")
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    half = dim // 2
    index = torch.arange(half, dtype=compute_dtype, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * index / half)  # (half,) ω_i
    args = timesteps.to(compute_dtype)[:, None] * freqs[None, :]  # (N, 1) * (1, half) -> (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (N, dim)
    return embedding.to(dtype)
