"""The low-resolution inputs of a super-resolution checkpoint (`diffusion.nets.superres`):
``sample.py ckpt=... low_res=PATH`` reads an npz in sample.py's format (uint8 NHWC
``arr_0``) or a folder of images, all at the checkpoint's ``low_res_size``; batch i takes the
next images in order, cycled when there are fewer than ``num_samples``."""

from __future__ import annotations

import torch

from diffusion.checkpoint import LoadedCheckpoint
from diffusion.jobs.inputs import read_uint8_images, to_model_range
from diffusion.utils.errors import ConfigError


def low_res_size(loaded: LoadedCheckpoint) -> int | None:
    """The checkpoint's low-resolution size, or None when it is not a super-resolution model."""
    return getattr(loaded.model, "low_res_size", None)


def read_low_res(path: str | None, loaded: LoadedCheckpoint) -> torch.Tensor | None:
    """(N, C, s, s) floats in [-1, 1] for a super-resolution checkpoint, None otherwise;
    a one-line ConfigError for a missing input, a wrong size, or low_res on another model."""
    size = low_res_size(loaded)
    if size is None:
        if path is not None:
            raise ConfigError(f"low_res={path}: the checkpoint is not a super-resolution model; leave low_res out")
        return None
    channels = loaded.image_shape[0]
    expected = (size, size, channels)
    if path is None:
        raise ConfigError(f"the checkpoint is a super-resolution model: pass low_res=NPZ_OR_FOLDER of "
                          f"{size}x{size}x{channels} images (HxWxC)")
    return to_model_range(read_uint8_images("low_res", path, expected))


def batch_low_res(low_res: torch.Tensor, start: int, size: int, device: torch.device) -> torch.Tensor:
    """The low-resolution images of the batch whose first sample is number ``start``."""
    index = torch.arange(start, start + size) % len(low_res)
    return low_res[index].to(device)
