"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) for every sampler.

One network trained with label dropout is both the conditional model out(x_t, y) and the
unconditional one out(x_t, ∅), where ∅ is the UNet's null label. Guided sampling uses

    out_w = out(x_t, ∅) + w · (out(x_t, y) − out(x_t, ∅))

on the mean channels, whatever they predict (ε, x_0, v). In Ho & Salimans' eq. 6,
ε̃ = (1 + w') ε(z, c) − w' ε(z), so w = 1 + w': w = 1 is plain conditional sampling, w = 0
unconditional sampling, w > 1 trades diversity for fidelity. For learned variances (2C
output channels) only the first C are guided; the variance channels are the conditional
model's, since a difference of log-variances is not a variance.

Where the null label comes from: the sampler's call signature is shared by every sampler,
so the null label travels in ``model_kwargs`` under ``NULL_LABEL_KEY`` ("null_label"),
beside the labels ``"y"``. ``Sampler.__call__`` always removes it before the model sees the
kwargs, so callers (the sample job) may pass it whether or not guidance is on:

    sampler(diffusion, model, shape=..., model_kwargs={"y": y, "null_label": unet.null_label})

Notation: ``scale`` is w, ``out_c`` / ``out_u`` are the conditional / unconditional outputs.
"""

from __future__ import annotations

import math

import torch

NULL_LABEL_KEY = "null_label"


def check_guidance_scale(scale) -> float | None:
    """``scale`` as a float (None stays None: no guidance); ValueError unless a finite number."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(
            f"guidance_scale must be null (no guidance) or a finite number (1 = conditional, "
            f"0 = unconditional, > 1 = guided), got {scale!r}"
        )
    return float(scale)


def needs_null_label(scale: float | None) -> bool:
    """Whether sampling at ``scale`` evaluates the unconditional model (w ∉ {None, 1})."""
    return check_guidance_scale(scale) not in (None, 1.0)


def check_guidance(scale: float | None, *, conditional: bool, null_label: int | None) -> None:
    """Raise ValueError if guidance at ``scale`` cannot run: it needs labels ``y``
    (``conditional``) and a model trained with a null class (``module.label_dropout > 0``)."""
    if not needs_null_label(scale):
        return
    if not conditional:
        raise ValueError(
            f"guidance_scale={scale} needs a class-conditional model and labels (model_kwargs "
            f"'y'); this model is unconditional: use guidance_scale=null"
        )
    if null_label is None:
        raise ValueError(
            f"guidance_scale={scale} needs a model with a null class (trained with "
            f"module.label_dropout > 0) and its index as model_kwargs['{NULL_LABEL_KEY}']; "
            f"none was given: use guidance_scale=null or 1 (conditional sampling)"
        )


def apply_guidance(model, model_kwargs: dict | None, scale: float | None):
    """The model and kwargs a sampler runs with: ``model`` itself when ``scale`` is None or
    1, else a `ClassifierFreeGuidance` wrapper. ``NULL_LABEL_KEY`` is always removed from
    the returned kwargs (a copy; the caller's dict is left alone)."""
    model_kwargs = dict(model_kwargs or {})
    null_label = model_kwargs.pop(NULL_LABEL_KEY, None)
    scale = check_guidance_scale(scale)
    check_guidance(scale, conditional=model_kwargs.get("y") is not None, null_label=null_label)
    if not needs_null_label(scale):
        return model, model_kwargs
    return ClassifierFreeGuidance(model, scale, int(null_label)), model_kwargs


def _doubled(value, batch: int):
    """A per-example tensor (first dim ``batch``) repeated for both halves; others as is."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return torch.cat([value, value])  # (B, ...) -> (2B, ...)
    return value


class ClassifierFreeGuidance:
    """``model`` called as the process calls it, ``(x_t, t, y=..., **kwargs)``, returning the
    guided output ``out_u + w (out_c − out_u)`` on the first C channels.

    For w ∉ {0, 1} both outputs come from ONE forward pass on the doubled batch
    [x_t, x_t] with labels [y, ∅] (other per-example kwargs are doubled too); w = 0 calls
    the model once on the batch with null labels only (exactly unconditional sampling).
    """

    def __init__(self, model, scale: float, null_label: int):
        self.model = model
        self.scale = float(scale)
        self.null_label = int(null_label)

    def __call__(self, x: torch.Tensor, t, y: torch.Tensor, **kwargs) -> torch.Tensor:
        null = torch.full_like(y, self.null_label)
        if self.scale == 0.0:
            return self.model(x, t, y=null, **kwargs)
        batch, channels = x.shape[:2]
        kwargs = {key: _doubled(value, batch) for key, value in kwargs.items()}
        out = self.model(
            torch.cat([x, x]),  # (B, C, H, W) -> (2B, C, H, W)
            _doubled(t, batch),
            y=torch.cat([y, null]),  # (B,) -> (2B,): conditional half first
            **kwargs,
        )
        out_c, out_u = out.chunk(2, dim=0)  # (2B, C', H, W) -> 2 x (B, C', H, W)
        return guide(out_c, out_u, self.scale, channels)


def guide(out_c: torch.Tensor, out_u: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
    """out_u + w (out_c − out_u) on the first ``channels`` (the mean part); the rest (the
    variance part of a learned-variance model, if any) is taken from ``out_c``."""
    mean_c, var_c = out_c.split([channels, out_c.shape[1] - channels], dim=1)  # C + (C' − C)
    mean_u = out_u[:, :channels]  # (B, C', H, W) -> (B, C, H, W)
    return torch.cat([mean_u + scale * (mean_c - mean_u), var_c], dim=1)  # (B, C', H, W)
