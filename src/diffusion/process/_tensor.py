"""The one helper that gathers schedule constants for a batch of timesteps."""

from __future__ import annotations

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
