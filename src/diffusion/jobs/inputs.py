"""Images given to a job on the command line (edit.py ``input=``, sample.py ``low_res=``):
an image folder or an npz as sample.py writes it (uint8 NHWC ``arr_0``), checked against the
size the checkpoint takes, with one-line errors that name the setting; or the first images of
a split of the checkpoint's run dataset, with what its loader gives beside them (`read_split`)."""

from __future__ import annotations

import os

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from diffusion.checkpoint import LoadedCheckpoint
from diffusion.utils.errors import ConfigError


def shape_error(key: str, what: str, shape, expected: tuple[int, int, int]) -> ConfigError:
    """``expected`` is (H, W, C)."""
    height, width, channels = expected
    return ConfigError(f"{key}={what} is {'x'.join(map(str, shape))} (HxWxC); the checkpoint takes "
                       f"{height}x{width}x{channels}: resize the images to {height}x{width} with {channels} "
                       f"channel(s)")


def read_uint8_images(key: str, source: str, expected: tuple[int, int, int], count: int | None = None,
                      missing_hint: str = "pass an image folder or an npz written by sample.py") -> np.ndarray:
    """The first ``count`` (all if None) images of folder or npz ``source`` as uint8
    (N, H, W, C), each of shape ``expected`` = (H, W, C)."""
    path = os.path.expanduser(str(source))
    if os.path.isdir(path):
        # Imported here: the datasets import torchvision (about 1 s with torch._dynamo), which
        # sample.py would otherwise pay at every start for an input it rarely has.
        from diffusion.data.datasets import list_images

        paths = list_images(path)[:count]
        if not paths:
            raise ConfigError(f"{key}={source} holds no images (.png, .jpg, ...); {missing_hint}")
        arrays = []
        for image_path in paths:
            with Image.open(image_path) as image:
                pixels = np.asarray(image)
            pixels = pixels[..., None] if pixels.ndim == 2 else pixels  # grey (H, W) -> (H, W, 1)
            if pixels.dtype != np.uint8 or pixels.shape != expected:
                raise shape_error(key, image_path, pixels.shape, expected)
            arrays.append(pixels)
        return np.stack(arrays)
    if os.path.isfile(path) and path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise ConfigError(f"{key}={source} holds no arr_0 (it holds {list(data.files)}); pass an npz "
                                  "written by sample.py")
            images = data["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ConfigError(f"{key}={source}: arr_0 is {images.dtype} of shape {images.shape}; expected uint8 "
                              "NHWC images, as sample.py writes")
        if images.shape[1:] != expected:
            raise shape_error(key, source, images.shape[1:], expected)
        return images[:count]
    raise ConfigError(f"{key}={source}: no such folder or .npz file; {missing_hint}")


def read_npz_labels(key: str, source: str, count: int) -> torch.Tensor:
    """``arr_1`` of the npz ``source`` (the labels sample.py writes for a class-conditional
    model) as (count,) int64; a one-line ConfigError where there is none or it does not fit."""
    with np.load(os.path.expanduser(str(source)), allow_pickle=False) as data:
        if "arr_1" not in data.files:
            raise ConfigError(f"class_labels=input: {key}={source} holds no labels (arr_1, as sample.py writes for a "
                              "class-conditional model); pass class_labels=null (random), K or a list")
        labels = data["arr_1"]
    if labels.ndim != 1 or len(labels) < count or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{key}={source}: arr_1 is {labels.dtype} of shape {labels.shape}; expected one integer "
                          f"label per image of arr_0 ({count}), as sample.py writes")
    return torch.from_numpy(labels[:count].astype(np.int64))


def to_model_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [−1, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def read_split(cfg: DictConfig, loaded: LoadedCheckpoint, split: str, count: int) -> tuple[torch.Tensor, dict]:
    """The first ``count`` images of ``split`` of the run's dataset (without augmentation,
    `diffusion.jobs.evaluate.data_for`) as (N, C, H, W) floats in [−1, 1], and the model
    kwargs its loader gives beside them: ``y`` (N,), the labels (absent for a dataset without
    labels, whose loader gives zeros), and for a super-resolution dataset also ``low_res``
    (N, C, s, s), area-downsampled exactly as in training (`diffusion.data.superres`)."""
    # Imported here: jobs.evaluate imports jobs.sample, which imports this module.
    from diffusion.jobs.evaluate import data_for, split_loader

    data = data_for(cfg, loaded)
    images, extras, total = [], [], 0
    for batch, extra in split_loader(data, split):
        images.append(batch)
        extras.append(dict(extra) if isinstance(extra, dict) else {"y": extra})  # (B,) labels or a dict
        total += len(batch)
        if total >= count:
            break
    kwargs = {key: torch.cat([extra[key] for extra in extras])[:count] for key in extras[0]}
    if data.num_classes is None:
        kwargs.pop("y", None)
    return torch.cat(images)[:count], kwargs


def checked_labels(key: str, labels: torch.Tensor | None, source: str, num_classes: int) -> torch.Tensor:
    """Labels for ``key``=input (a split's, ``read_split``'s ``y``, or an npz's) as int64: a
    one-line ConfigError when there are none or some are not classes of the model."""
    if labels is None:
        raise ConfigError(f"{key}=input: {source} has no labels; pass {key}=null (random), K or a list")
    labels = labels.long()
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ConfigError(f"{key}=input: {source} holds labels up to {int(labels.max())}, outside the checkpoint's "
                          f"classes 0..{num_classes - 1}; pass data=... of the run's dataset, or {key}=K")
    return labels
