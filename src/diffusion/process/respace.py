"""Respacing: run a diffusion process on a subset of its timesteps (IDDPM sec. 4, DDIM sec. 4.2).

Keeping steps S = {s_1 < ... < s_K} of a T-step process gives a K-step process with the
same marginals q(x_{s_k} | x_0): its betas are β'_k = 1 − ᾱ_{s_k}/ᾱ_{s_{k-1}} (IDDPM eq. 19),
so a model trained on all T steps can sample in K. The model is still called with the
ORIGINAL step indices, as openai/improved-diffusion's ``respace.py`` does.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from diffusion.process._tensor import device_table, scale_timesteps
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


_SECTION_COUNTS_FORMS = (
    "section counts like '10,15,20' (positive ints, comma separated), an int, a list of "
    "ints, or 'ddimN'"
)


def _positive_int(part) -> int | None:
    """``part`` as a positive int (an int, or a string of digits), else None."""
    if isinstance(part, (int, np.integer)) and not isinstance(part, bool):
        return int(part) if part > 0 else None
    if isinstance(part, str) and part.isdigit() and int(part) > 0:
        return int(part)
    return None


def normalize_section_counts(section_counts, arg_name: str = "section_counts") -> str:
    """``section_counts`` as the canonical string ``"a,b,c"`` or ``"ddimN"``.

    The one parser of the respacing rules. Accepts an int, a sequence of ints (a config
    override may give ``10`` or ``[10, 15, 20]``), or such a string (spaces ignored).
    Raises ValueError naming ``arg_name``, the bad value and the accepted forms.
    """
    parts = []
    if isinstance(section_counts, str):
        text = section_counts.replace(" ", "")
        if text.startswith("ddim") and text[len("ddim") :].isdigit():
            return text
        parts = text.split(",")
    elif _positive_int(section_counts) is not None:
        parts = [section_counts]
    elif isinstance(section_counts, Iterable):  # a list, a tuple, OmegaConf's ListConfig
        parts = list(section_counts)
    counts = [_positive_int(p) for p in parts]
    if not counts or None in counts:
        raise ValueError(f"{arg_name} must be {_SECTION_COUNTS_FORMS}, got {section_counts!r}")
    return ",".join(map(str, counts))


def _section_steps(start: int, size: int, count: int) -> list[int]:
    """``count`` steps evenly spaced over ``size`` steps from ``start``, both ends kept.

    The stride is ACCUMULATED in floating point and rounded with Python's round (to even
    at .5), as openai/improved-diffusion's ``space_timesteps`` does, so that we keep its
    step set bit for bit. round(k * stride) differs where k·stride is at or near a .5 and
    the sum's rounding error tips it (T = 300, "10,15,20": 7 · 99/14 = 49.5 -> 50, the sum
    of seven strides 49.49999999999999 -> 49, so step 149 where the product gives 150).
    """
    frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur_idx, steps = 0.0, []
    for _ in range(count):
        steps.append(start + round(cur_idx))
        cur_idx += frac_stride
    return steps


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """Which original timesteps to keep (improved-diffusion's convention).

    The T steps are cut into ``len(section_counts)`` equal sections (the first T mod n
    sections one step longer); section i keeps ``section_counts[i]`` steps evenly spaced
    over it, both ends included (see ``_section_steps``). E.g. T=300 with [10, 15, 20]
    strides the three 100-step sections into 10, 15 and 20 steps.

    :param section_counts: anything ``normalize_section_counts`` accepts: an int (one
        section), a list of ints, a string ``"a,b,c"``, or ``"ddimN"``: the fixed integer
        stride of the DDIM paper, range(0, T, stride), with exactly N steps (ValueError
        when no stride gives N).
    :return: a set of 0-based original step indices.
    """
    text = normalize_section_counts(section_counts)
    if text.startswith("ddim"):
        return _ddim_stride_steps(num_timesteps, int(text[len("ddim") :]))
    counts = [int(c) for c in text.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(
                f"cannot divide a section of {size} steps into {count} (section_counts={section_counts!r})"
            )
        steps += _section_steps(start, size, count)
        start += size
    return set(steps)


def _original_timesteps(timestep_map, t, rescale_timesteps, original_num_steps):
    """Respaced indices -> what the network saw in training (original index, maybe rescaled)."""
    map_tensor = device_table(timestep_map, torch.int64, t.device)
    return scale_timesteps(map_tensor[t.long()], original_num_steps, rescale_timesteps)


def respace(diffusion: GaussianDiffusion, use_timesteps) -> SpacedDiffusion:
    """``diffusion`` restricted to its steps ``use_timesteps`` (0-based), with every other
    setting kept (all of its ``init_kwargs``): the one way to respace a process.

    A SpacedDiffusion is respaced from its own base process, with ``use_timesteps`` read
    as ITS step indices (k -> timestep_map[k]), so the model still gets original indices.
    """
    if not isinstance(diffusion, SpacedDiffusion):
        return SpacedDiffusion(use_timesteps, **diffusion.init_kwargs)
    kept = _checked_steps(use_timesteps, diffusion.num_timesteps)
    return SpacedDiffusion(diffusion.timestep_map[sorted(kept)], **diffusion.base_kwargs)


def _checked_steps(use_timesteps, num_timesteps: int) -> set[int]:
    """``use_timesteps`` as a set of ints, refused unless non-empty and in [0, T)."""
    kept = set(int(s) for s in use_timesteps)
    bad = sorted(s for s in kept if not 0 <= s < num_timesteps)
    if not kept or bad:
        raise ValueError(
            f"use_timesteps must be a non-empty set of indices in [0, {num_timesteps}); "
            f"got {len(kept)} indices, out of range: {bad[:5]}"
        )
    return kept


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion that keeps only ``use_timesteps`` of a base process.

    :param use_timesteps: collection of original 0-based indices to keep (e.g. from
        space_timesteps).
    :param kwargs: GaussianDiffusion's keyword arguments for the BASE process (its betas).
        Build one from a process with ``respace(diffusion, use_timesteps)``, which passes
        them all.

    ``timestep_map[k]`` is the original index of respaced step k; ``original_num_steps``
    is the base T; ``base_kwargs`` is the base process's ``init_kwargs`` (``init_kwargs``
    itself holds the respaced betas). Models passed to any method are wrapped so that they
    receive original indices (scaled by 1000/original_num_steps when ``rescale_timesteps``).
    """

    def __init__(self, use_timesteps, **kwargs):
        base = GaussianDiffusion(**kwargs)
        self.base_kwargs = base.init_kwargs
        self.original_num_steps = base.num_timesteps
        self.use_timesteps = _checked_steps(use_timesteps, base.num_timesteps)
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
