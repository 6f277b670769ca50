"""The process's tensor plumbing, each piece written once: the gather of schedule constants
for a batch of timesteps, the noise draw, where a model lives, and the timesteps a model sees.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

# (id(arr), dtype, device) -> (arr, table): each schedule constant crosses to a device once.
# A host-to-device copy from pageable memory makes the host wait for the device, so
# copying a (T,) table on every call would put several synchronisations in each training
# step. Holding ``arr`` in the entry keeps its id from being reused while the entry lives;
# schedules are never modified in place after construction.
_DEVICE_TABLES: dict[tuple, tuple[np.ndarray, torch.Tensor]] = {}
_MAX_TABLES = 512


def device_table(arr: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``arr`` as a tensor of ``dtype`` on ``device``, copied there once and then reused."""
    key = (id(arr), dtype, torch.device(device))
    entry = _DEVICE_TABLES.get(key)
    if entry is not None and entry[0] is arr:
        return entry[1]
    if len(_DEVICE_TABLES) >= _MAX_TABLES:
        _DEVICE_TABLES.clear()
    # Cast on the host first: some devices (MPS) have no float64.
    table = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype=dtype).to(device)
    _DEVICE_TABLES[key] = (arr, table)
    return table


def extract_into_tensor(
    arr: np.ndarray, timesteps: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """Gather ``arr[timesteps]``, shaped to broadcast against ``like``.

    Schedule constants live in float64 numpy arrays (computed once, for accuracy); this is
    the only place where they meet tensors. The gathered values are cast to ``like``'s
    dtype and device, so float32 inputs get float32 constants and float64 tests stay exact.

    :param arr: 1-D numpy array of length T (one value per diffusion step).
    :param timesteps: int64 tensor of shape (B,), 0-based step indices.
    :param like: tensor of shape (B, ...) whose dtype, device and rank the result takes.
    :return: shape (B, 1, ..., 1) with ``like.ndim`` dimensions, row b = ``arr[timesteps[b]]``.
        It stays this small on purpose (improved-diffusion expands to the full shape):
        sqrt/exp of schedule constants then cost B operations, not B·C·H·W.
    """
    if timesteps.ndim != 1 or timesteps.shape[0] != like.shape[0]:
        raise ValueError(
            f"timesteps must have shape ({like.shape[0]},) to match the batch, "
            f"got {tuple(timesteps.shape)}"
        )
    table = device_table(arr, like.dtype, like.device)
    values = table[timesteps.to(like.device).long()]  # (B,)
    return values.view(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B, 1, ..., 1)


# ------------------------------------------------------------------------------ noise
def randn(shape, generator: torch.Generator | None, *, dtype=None, device=None) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device`` (default CPU) in ``dtype``.

    Drawn where the generator lives and then moved, so that a CPU generator gives the same
    numbers whatever device the samples live on (one seed, one set of images).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    where = device if generator is None else generator.device
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=where).to(device)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``randn`` of x's shape, dtype and device."""
    return randn(x.shape, generator, dtype=x.dtype, device=x.device)


# ------------------------------------------------------------------ the model's placement
def _first_tensor(model, floating_only: bool) -> torch.Tensor | None:
    if not isinstance(model, torch.nn.Module):
        return None  # a closure or a wrapper: its tensors, if any, are out of sight
    tensors = itertools.chain(model.parameters(), model.buffers())
    return next((x for x in tensors if x.is_floating_point() or not floating_only), None)


def model_device(model) -> torch.device | None:
    """Where an nn.Module's tensors live (its first parameter or buffer); None for a model
    without tensors, e.g. a closure around a network or an analytic model, whose device
    only the caller knows."""
    tensor = _first_tensor(model, floating_only=False)
    return None if tensor is None else tensor.device


def model_dtype(model) -> torch.dtype | None:
    """The float type of an nn.Module's first floating parameter or buffer; None if none."""
    tensor = _first_tensor(model, floating_only=True)
    return None if tensor is None else tensor.dtype


# ------------------------------------------------------------- the timesteps a model sees
# improved-diffusion's ``rescale_timesteps``: the network receives t·1000/T as floats, so
# that it sees the 0..1000 range of the DDPM paper's T = 1000 runs whatever T is.
RESCALED_TIME_RANGE = 1000.0


def timestep_scale(num_timesteps: int, rescale_timesteps: bool) -> float:
    """The factor from a 0-based step index of a T-step process to the network's input:
    1000/T with ``rescale_timesteps``, else 1."""
    return RESCALED_TIME_RANGE / num_timesteps if rescale_timesteps else 1.0


def scale_timesteps(t: torch.Tensor, num_timesteps: int, rescale_timesteps: bool) -> torch.Tensor:
    """What the network receives for step indices ``t``: ``t`` itself (int64), or
    t·1000/T as float32 with ``rescale_timesteps``."""
    if not rescale_timesteps:
        return t
    return t.float() * timestep_scale(num_timesteps, True)


def unscale_timesteps(t: torch.Tensor, num_timesteps: int, rescale_timesteps: bool) -> torch.Tensor:
    """The inverse of ``scale_timesteps``: the network's timesteps as float64 (fractional)
    step indices, t·T/1000 with ``rescale_timesteps``."""
    if not rescale_timesteps:
        return t.double()
    return t.double() * (num_timesteps / RESCALED_TIME_RANGE)
