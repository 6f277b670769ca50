"""The low-resolution inputs of a super-resolution checkpoint (`diffusion.nets.superres`):
``sample.py ckpt=... low_res=PATH`` reads an npz in sample.py's format (uint8 NHWC
``arr_0``) or a folder of images, all at the checkpoint's ``low_res_size``; batch i takes the
next images in order, cycled when there are fewer than ``num_samples``."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from diffusion.checkpoint import LoadedCheckpoint
from diffusion.data.datasets import list_images
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
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        pixels = _folder_pixels(path, expected)
    elif os.path.isfile(path) and path.endswith(".npz"):
        pixels = _npz_pixels(path, expected)
    else:
        raise ConfigError(f"low_res={path}: no such folder or .npz file; pass an image folder or an npz as "
                          "sample.py writes")
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, s, s, C) -> (N, C, s, s)


def batch_low_res(low_res: torch.Tensor, start: int, size: int, device: torch.device) -> torch.Tensor:
    """The low-resolution images of the batch whose first sample is number ``start``."""
    index = torch.arange(start, start + size) % len(low_res)
    return low_res[index].to(device)


def _size_error(what: str, shape, expected) -> ConfigError:
    return ConfigError(f"low_res={what} is {'x'.join(map(str, shape))} (HxWxC); the checkpoint takes "
                       f"{'x'.join(map(str, expected))} low-resolution images")


def _folder_pixels(folder: str, expected) -> np.ndarray:
    paths = list_images(folder)
    if not paths:
        raise ConfigError(f"low_res={folder} holds no images (.png, .jpg, ...)")
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            pixels = np.asarray(image)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels  # grey (H, W) -> (H, W, 1)
        if pixels.dtype != np.uint8 or pixels.shape != expected:
            raise _size_error(path, pixels.shape, expected)
        arrays.append(pixels)
    return np.stack(arrays)


def _npz_pixels(path: str, expected) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        images = data["arr_0"] if "arr_0" in data.files else None
    if images is None or images.dtype != np.uint8 or images.ndim != 4:
        raise ConfigError(f"low_res={path}: expected uint8 NHWC images in arr_0, as sample.py writes")
    if images.shape[1:] != expected:
        raise _size_error(path, images.shape[1:], expected)
    return images
