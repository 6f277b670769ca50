"""The low-resolution inputs of a super-resolution checkpoint (`diffusion.nets.superres`).

``sample.py ckpt=... low_res=SOURCE`` takes them from an npz in sample.py's format (uint8
NHWC ``arr_0``) or a folder of images, all at the checkpoint's ``low_res_size``, or, with
``low_res=split:test`` (``train``, ``val``), from that split of the checkpoint's run dataset,
downsampled by the same `SuperResData` pairs as in training (area averaging, not re-quantised
to 8 bits). One key holds the one source, so no two settings can disagree; the shard key
(`diffusion.jobs.shards`) holds that key and a digest of the images (and labels) read from
it, so that a changed file or split is noticed on resume. Sample i is conditioned on
low-resolution image i,
cycled when there are fewer than ``num_samples``; evaluate.py ``metric=fid`` uses
``split:<split>`` unless ``low_res`` is given, and ``metric=nll`` the pairs of its split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from omegaconf import DictConfig, open_dict

from diffusion.checkpoint import LoadedCheckpoint
from diffusion.jobs.checks import INPUT_LABELS, SPLITS
from diffusion.jobs.inputs import (
    checked_labels,
    read_npz_labels,
    read_split,
    read_uint8_images,
    shape_error,
    to_model_range,
)
from diffusion.utils.errors import ConfigError

SPLIT_PREFIX = "split:"


def low_res_size(loaded: LoadedCheckpoint) -> int | None:
    """The checkpoint's low-resolution size, or None when it is not a super-resolution model."""
    return getattr(loaded.model, "low_res_size", None)


def low_res_split(source) -> str | None:
    """The split named by ``split:NAME``, None for a path; a ConfigError for an unknown split."""
    if not str(source).startswith(SPLIT_PREFIX):
        return None
    split = str(source)[len(SPLIT_PREFIX):]
    if split not in SPLITS:
        raise ConfigError(f"low_res={source}: {split!r} is not a split; pass low_res=split:test (or split:train, "
                          "split:val), an npz or an image folder")
    return split


def read_conditioning(cfg: DictConfig, loaded: LoadedCheckpoint) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(``cfg.low_res`` as (N, C, s, s) floats in [-1, 1] for a super-resolution checkpoint
    (a split: its first ``num_samples`` images), None otherwise; with ``class_labels=input``
    the (N,) labels of those images, read with them from their split or their npz's
    ``arr_1``, else None). A one-line ConfigError for a missing input, a wrong size, low_res
    on another model, or labels that are missing or not the model's classes."""
    split = check_conditioning(cfg, loaded)
    source = cfg.get("low_res")
    if source is None:
        return None, None
    wants_labels = cfg.get("class_labels") == INPUT_LABELS
    if split is None:
        low_res = read_low_res_images("low_res", source, loaded)
        if not wants_labels:
            return low_res, None
        labels = read_npz_labels("low_res", source, len(low_res))  # a cascade: sample.py's npz of the base model
        return low_res, checked_labels("class_labels", labels, f"low_res={source}", loaded.num_classes)
    _, low_res, kwargs = split_low_res("low_res", cfg, loaded, split, cfg.num_samples)
    if not wants_labels:
        return low_res, None
    return low_res, checked_labels("class_labels", kwargs.get("y"), f"split {split} of the dataset", loaded.num_classes)


def check_conditioning(cfg: DictConfig, loaded: LoadedCheckpoint) -> str | None:
    """The checks of `read_conditioning` that read no input (evaluate.py makes them before
    it builds its reference set); returns the low_res split, or None."""
    source, size = cfg.get("low_res"), low_res_size(loaded)
    wants_labels = cfg.get("class_labels") == INPUT_LABELS
    if size is None:
        if source is not None:
            raise ConfigError(f"low_res={source}: the checkpoint is not a super-resolution model; leave low_res out")
        if wants_labels:
            raise input_labels_error()
        return None
    if source is None:
        channels = loaded.image_shape[0]
        raise ConfigError(f"the checkpoint is a super-resolution model: pass low_res=NPZ_OR_FOLDER of "
                          f"{size}x{size}x{channels} images (HxWxC), or low_res=split:test")
    split = low_res_split(source)
    if wants_labels and (loaded.num_classes is None or (split is None and not str(source).endswith(".npz"))):
        raise input_labels_error()
    return split


def conditioning_digest(low_res: torch.Tensor | None, labels: torch.Tensor | None) -> str | None:
    """SHA-256 of the inputs a super-resolution job conditions on (None without any): the
    shard key's, so that a resumed job whose low_res file or split changed (another
    data=..., files replaced) is refused instead of mixing old shards with new inputs."""
    if low_res is None:
        return None
    digest = hashlib.sha256(low_res.detach().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        digest.update(labels.detach().cpu().long().contiguous().numpy().tobytes())
    return digest.hexdigest()


def input_labels_error() -> ConfigError:
    return ConfigError("class_labels=input gives each sample the label of its low-resolution image, which needs a "
                       "class-conditional super-resolution checkpoint and low_res=split:test (split:train, split:val) "
                       "or an npz with labels (arr_1, as sample.py writes); else pass class_labels=null (random), "
                       "K or a list")


def read_low_res_images(key: str, source: str, loaded: LoadedCheckpoint, count: int | None = None) -> torch.Tensor:
    """The folder or npz ``source`` (setting ``key``) of low-resolution images as (N, C, s, s)
    floats in [-1, 1]."""
    size, channels = low_res_size(loaded), loaded.image_shape[0]
    return to_model_range(read_uint8_images(key, source, (size, size, channels), count))


def split_low_res(key: str, cfg: DictConfig, loaded: LoadedCheckpoint, split: str,
                  count: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The first ``count`` (high-resolution image, low-resolution image) pairs of ``split``
    and the other model kwargs of the loader (the labels ``y``), checked against the model."""
    images, kwargs = read_split(cfg, loaded, split, count)
    if "low_res" not in kwargs:
        raise ConfigError(f"{key}: the checkpoint's dataset gives no low-resolution images (not SuperResData); "
                          "pass an npz or an image folder at the low resolution")
    low_res = kwargs.pop("low_res")
    size, channels = low_res_size(loaded), loaded.image_shape[0]
    if tuple(low_res.shape[1:]) != (channels, size, size):
        found = (*low_res.shape[2:], low_res.shape[1])  # (C, s, s) -> sxsxC, as the message reads
        raise shape_error(key, f"split:{split}", found, (size, size, channels))
    return images, low_res, kwargs


def cycled_batch(inputs: torch.Tensor, start: int, size: int, device: torch.device) -> torch.Tensor:
    """The inputs (low-resolution images, or their labels) of the batch whose first sample is
    number ``start``: sample i takes input i, cycled."""
    index = torch.arange(start, start + size) % len(inputs)
    return inputs[index].to(device)


def condition_on_split(cfg: DictConfig, loaded: LoadedCheckpoint) -> None:
    """evaluate.py ``metric=fid`` on a super-resolution checkpoint without ``low_res``: sample i
    on the low-resolution version of image i of ``split`` (cycled)."""
    if low_res_size(loaded) is not None and cfg.get("low_res") is None:
        with open_dict(cfg):
            cfg.low_res = f"{SPLIT_PREFIX}{cfg.split}"


def wrapped_data(data_cfg):
    """The config of the dataset a `SuperResData` config wraps (whose images the model makes),
    else ``data_cfg`` itself."""
    if str(data_cfg.get("_target_", "")).endswith("SuperResData") and data_cfg.get("data"):
        return data_cfg["data"]
    return data_cfg


def loader_model_kwargs(loaded: LoadedCheckpoint, device: torch.device) -> Callable[[object], dict] | None:
    """A split loader's labels -> the model kwargs (evaluate's ``model_kwargs_fn``), on
    ``device``: ``y`` for a class-conditional model, and a super-resolution dataset's
    ``low_res`` (its batches carry a dict in place of the labels); None when neither applies."""
    conditional = loaded.num_classes is not None
    if not conditional and low_res_size(loaded) is None:
        return None

    def model_kwargs(extra) -> dict:
        extra = dict(extra) if isinstance(extra, dict) else {"y": extra}
        if not conditional:
            extra.pop("y", None)
        return {key: value.to(device) for key, value in extra.items()}

    return model_kwargs
