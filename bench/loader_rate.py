"""Images/s of a preset's real training loader (its dataset's transforms, its num_workers),
on files written in the dataset's on-disk format to a temporary folder (digits: in memory).

Over the training images/s, > 1 means the loader can keep the model fed. The first batches
(worker start-up) are discarded; batches the workers prefetched meanwhile count.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import hydra

import dataset_files

LOADER_VAL_SIZE = 100  # images held out for validation: their number, not the per-image cost


def write_cifar10(folder: Path, images: int) -> dict:
    dataset_files.write_cifar10(folder, n=math.ceil(images / 5))  # 5 training batch files
    return {"root": str(folder), "download": False, "val_size": LOADER_VAL_SIZE}


def write_imagenet64(folder: Path, images: int) -> dict:
    dataset_files.write_imagenet64(folder / "imagenet64", n_train=math.ceil(images / 10))  # 10 files
    return {"root": str(folder / "imagenet64"), "val_size": LOADER_VAL_SIZE}


# Dataset class -> writer of enough files in its format, returning the config keys that point
# the dataset at them (None: the data is in memory).
DATA_FILES = {"DigitsData": None, "Cifar10Data": write_cifar10, "ImageNet64Data": write_imagenet64}


def endless(loader):
    while True:  # epochs follow each other, as in training
        yield from loader


def loader_rate(cfg, warmup: int, batches: int) -> tuple[float, int] | None:
    """(images/s, num_workers) of the config's training loader over ``batches`` batches after
    ``warmup`` (at least one: worker start-up); None for a dataset without a writer here."""
    name = cfg.data._target_.rsplit(".", 1)[-1]
    if name not in DATA_FILES:
        return None
    batch = int(cfg.data.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        writer = DATA_FILES[name]
        extra = writer(Path(folder), batch * (warmup + batches) + LOADER_VAL_SIZE) if writer else {}
        data = hydra.utils.instantiate(cfg.data, **extra)
        data.setup("fit")
        stream = endless(data.train_dataloader())
        for _ in range(max(1, warmup)):
            next(stream)
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        elapsed = time.perf_counter() - start
        stream.close()
    return batch * batches / elapsed, data.num_workers
