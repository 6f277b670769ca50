"""Test-only helpers: a probe image for the center crop, and a NaN-injecting callback.

The writers of each dataset's real on-disk format (`write_cifar10`, ...) live in
bench/dataset_files.py (on pytest's ``pythonpath``), since the loader benchmark times the
real loaders on their files too.
"""

# ruff: noqa: I001  (diffusion must be imported before lightning and torchvision)

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

import diffusion  # noqa: F401  (first: makes torchvision, hence lightning, importable)
from lightning.pytorch import Callback



def save_image(path: Path, width: int = 48, height: int = 16, mode: str = "RGB") -> None:
    """Black, with a white square of side ``height`` in the middle: what the center crop keeps."""
    pixels = np.zeros((height, width, 3), np.uint8)
    left = (width - height) // 2
    pixels[:, left : left + height] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


class InjectNaN(Callback):
    """Fills the images of the batches drawn at ``steps`` (global steps) with NaN: a fault to
    inject into train.py with ``PYTHONPATH=tests`` and
    ``+callbacks.nan._target_=fixtures.InjectNaN '+callbacks.nan.steps=[5]'``."""

    def __init__(self, steps: Sequence[int]) -> None:
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            batch[0].fill_(float("nan"))
