"""`DataModule`: Lightning's view of an `ImageData`, for training.

The datasets themselves (`diffusion.data.image_data`) are plain torch, so that the sample
and evaluate jobs read them without Lightning; training hands the Trainer this adapter.
Lightning calls ``prepare_data`` on one process per node (a download) and ``setup`` on
every process; the loaders, the resumable training order included, are the dataset's own.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from diffusion.data.image_data import ImageData


class DataModule(L.LightningDataModule):
    """Wraps ``data``; its shape and labels (``image_size``, ``channels``, ``num_classes``)
    are the dataset's."""

    def __init__(self, data: ImageData) -> None:
        super().__init__()
        self.data = data

    @property
    def image_size(self) -> int:
        return self.data.image_size

    @property
    def channels(self) -> int:
        return self.data.channels

    @property
    def num_classes(self) -> int | None:
        return self.data.num_classes

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.data.setup(stage)

    def train_dataloader(self) -> DataLoader:
        return self.data.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.data.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.data.test_dataloader()
