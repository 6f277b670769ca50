"""`SuperResData`: any `ImageData` as (high-resolution image, model kwargs with ``low_res``)
pairs for super-resolution training (IDDPM App. A, arXiv 2102.09672).

The low-resolution image is the high-resolution one downsampled by area averaging, as
improved-diffusion's ``super_res_train.py`` makes it (``F.interpolate(..., mode="area")``),
from the same (flipped or not) image, in [-1, 1] and not re-quantised to 8 bits. Batches
are ``(images, {"low_res": (B, C, s, s), "y": (B,)})``; `DiffusionModule` passes the dict
to the network as model kwargs (the labels as ``y`` only in a class-conditional run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from diffusion.data.image_data import ImageData


def downsample_area(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size) by area averaging (improved-diffusion's choice)."""
    return F.interpolate(images, size=(size, size), mode="area")


class LowResPairs(Dataset):
    """``dataset``'s (image, label) items as (image, {"low_res": image at ``size``, "y": label})."""

    def __init__(self, dataset: Dataset, size: int) -> None:
        self.dataset = dataset
        self.size = size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        low_res = downsample_area(image[None], self.size)[0]  # (C, H, W) -> (C, s, s)
        return image, {"low_res": low_res, "y": label}


class SuperResData(ImageData):
    """Wraps ``data`` (any dataset of ``configs/data/``): its shape, labels and splits, with
    each image paired with its ``low_res_size`` version. The loader settings are ``data``'s
    unless given here (``data.batch_size=16`` then works as for any dataset)."""

    def __init__(self, data: ImageData, *, low_res_size: int, batch_size: int | None = None,
                 num_workers: int | None = None, pin_memory: bool | None = None,
                 persistent_workers: bool | None = None) -> None:
        given = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                     persistent_workers=persistent_workers)
        super().__init__(**{key: getattr(data, key) if value is None else value for key, value in given.items()})
        if not isinstance(low_res_size, int) or not 1 <= low_res_size < data.image_size:
            raise ValueError(f"low_res_size={low_res_size!r} must be an int in [1, image_size={data.image_size})")
        self.data = data
        self.low_res_size = low_res_size
        self.image_size = data.image_size
        self.channels = data.channels

    @property
    def num_classes(self) -> int | None:
        return self.data.num_classes

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        return tuple(LowResPairs(split, self.low_res_size) for split in self.data.build_splits())
