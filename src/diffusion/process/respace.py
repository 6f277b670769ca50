"""Respacing: run a diffusion process on a subset of its timesteps (IDDPM sec. 4, DDIM sec. 4.2).

Keeping steps S = {s_1 < ... < s_K} of a T-step process gives a K-step process with the
same marginals q(x_{s_k} | x_0): its betas are β'_k = 1 − ᾱ_{s_k}/ᾱ_{s_{k-1}} (IDDPM eq. 19),
so a model trained on all T steps can sample in K. The model is still called with the
ORIGINAL step indices, as openai/improved-diffusion's ``respace.py`` does.
"""

from __future__ import annotations

import numpy as np
import torch

from diffusion.process._tensor import device_table
from diffusion.process.gaussian_diffusion import GaussianDiffusion


def _ddim_stride_steps(num_timesteps: int, desired_count: int) -> set[int]:
    """range(0, T, stride) with exactly ``desired_count`` elements (DDIM's even striding)."""
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == desired_count:
            return set(range(0, num_timesteps, stride))
    raise ValueError(
        f"cannot take exactly {desired_count} steps of {num_timesteps} with an integer stride "
        f"(ddim{desired_count}); try a count that divides {num_timesteps} or a plain count"
    )


def _parse_section_counts(section_counts) -> list[int]:
    if isinstance(section_counts, (int, np.integer)) and not isinstance(section_counts, bool):
        return [int(section_counts)]
    if isinstance(section_counts, str):
        try:
            return [int(x) for x in section_counts.split(",")]
        except ValueError:
            pass
    elif isinstance(section_counts, (list, tuple)):
        if all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in section_counts
        ):
            return [int(c) for c in section_counts]
    raise ValueError(
        f"invalid section_counts {section_counts!r}; use an int, a list of ints, "
        f"a string 'a,b,c' or 'ddimN'"
    )


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """Which original timesteps to keep (improved-diffusion's convention).

    The T steps are cut into ``len(section_counts)`` equal sections (the first T mod n
    sections one step longer); section i keeps ``section_counts[i]`` steps evenly spaced
    over it, both ends included. E.g. T=300 with [10, 15, 20] strides the three
    100-step sections into 10, 15 and 20 steps.

    :param section_counts: an int (one section), a list of ints, a string ``"a,b,c"``, or
        ``"ddimN"``: the fixed integer stride of the DDIM paper, range(0, T, stride), with
        exactly N steps (ValueError when no stride gives N).
    :return: a set of 0-based original step indices.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        try:
            desired = int(section_counts[len("ddim") :])
        except ValueError:
            raise ValueError(
                f"invalid section_counts {section_counts!r}; expected 'ddimN'"
            ) from None
        return _ddim_stride_steps(num_timesteps, desired)
    counts = _parse_section_counts(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ValueError(
                f"cannot divide a section of {size} steps into {count} (section_counts={section_counts!r})"
            )
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        steps += [start + round(k * stride) for k in range(count)]
        start += size
    return set(steps)


def _original_timesteps(timestep_map, t, rescale_timesteps, original_num_steps):
    """Respaced indices -> what the network saw in training (original index, maybe rescaled)."""
    map_tensor = device_table(timestep_map, torch.int64, t.device)
    new_t = map_tensor[t.long()]
    if rescale_timesteps:
        return new_t.float() * (1000.0 / original_num_steps)
    return new_t


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion that keeps only ``use_timesteps`` of a base process.

    :param use_timesteps: collection of original 0-based indices to keep (e.g. from
        space_timesteps).
    :param kwargs: GaussianDiffusion's keyword arguments for the BASE process (its betas).

    ``timestep_map[k]`` is the original index of respaced step k; ``original_num_steps``
    is the base T. Models passed to any method are wrapped so that they receive original
    indices (scaled by 1000/original_num_steps when ``rescale_timesteps``).
    """

    def __init__(self, use_timesteps, **kwargs):
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        self.use_timesteps = set(int(s) for s in use_timesteps)
        bad = sorted(s for s in self.use_timesteps if not 0 <= s < base.num_timesteps)
        if not self.use_timesteps or bad:
            raise ValueError(
                f"use_timesteps must be a non-empty set of indices in [0, {base.num_timesteps}); "
                f"got {len(self.use_timesteps)} indices, out of range: {bad[:5]}"
            )
        self.timestep_map = np.array(sorted(self.use_timesteps), dtype=np.int64)
        # IDDPM eq. 19: β'_k = 1 − ᾱ_{s_k}/ᾱ_{s_{k-1}}, with ᾱ = 1 before the first kept step.
        kept = base.alphas_cumprod[self.timestep_map]
        new_betas = 1.0 - kept / np.append(1.0, kept[:-1])
        super().__init__(**{**kwargs, "betas": new_betas})

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(
            model, self.timestep_map, self.rescale_timesteps, self.original_num_steps
        )

    def _scale_timesteps(self, t):
        return t  # the wrapped model maps and scales

    def model_timesteps(self, t):
        """The timesteps the network receives for respaced indices ``t``."""
        return _original_timesteps(
            self.timestep_map, t, self.rescale_timesteps, self.original_num_steps
        )


class _WrappedModel:
    """Calls ``model`` with original timesteps instead of respaced indices."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        new_ts = _original_timesteps(
            self.timestep_map, ts, self.rescale_timesteps, self.original_num_steps
        )
        return self.model(x, new_ts, **kwargs)
