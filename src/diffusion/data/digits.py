"""scikit-learn's 8x8 handwritten digits and their one train / validation / test split.

The quickstart trains on the training part, validates and tests on the held-out parts, and
the digits FID (`diffusion.evaluation.fid`) trains its classifier on, and takes its
reference statistics from, the same training part and reports the classifier's accuracy on
the same test part. Every user of the digits asks `digits_split` for its indices, so the
two can never disagree about which image is held out.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

SPLITS = ("train", "val", "test", "all")
# The split everyone uses unless a run configures its own (DigitsData's defaults).
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
SPLIT_SEED = 0


@cache
def _load() -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (N, 8, 8) in 0..255, labels int64 (N,)), read once per process."""
    from sklearn.datasets import load_digits  # lazy: only the digits need scikit-learn

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 17 grey levels 0..16 -> 0..255
    return pixels, digits.target.astype(np.int64)


def digits_split(val_fraction: float = VAL_FRACTION, test_fraction: float = TEST_FRACTION,
                 split_seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Indices of the train, val and test parts (and ``all``), stratified by label.

    The test part is drawn first, then the validation part from the rest (scikit-learn's
    ``train_test_split``, seeded by ``split_seed``), each of ``round(fraction * N)`` images.
    """
    from sklearn.model_selection import train_test_split

    _, labels = _load()
    n = len(labels)
    rest, test = train_test_split(np.arange(n), test_size=round(test_fraction * n),
                                  stratify=labels, random_state=split_seed)
    train, val = train_test_split(rest, test_size=round(val_fraction * n),
                                  stratify=labels[rest], random_state=split_seed)
    return {"train": train, "val": val, "test": test, "all": np.arange(n)}


def digits_uint8(image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as uint8 (N, 1, image_size, image_size) in 0..255, and int64 labels.

    The 17 grey levels become 8-bit intensities round(v·255/16); another ``image_size``
    resizes those uint8 images once (bilinear, antialiased).
    """
    pixels, labels = _load()
    images = torch.from_numpy(pixels.copy()).unsqueeze(1)  # (N, 8, 8) -> (N, 1, 8, 8); the cache stays intact
    if image_size != images.shape[-1]:
        images = v2.functional.resize(images, [image_size, image_size],
                                      interpolation=InterpolationMode.BILINEAR, antialias=True)
    return images, torch.from_numpy(labels.copy())


def digits_images(split: str, image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images and labels of one part of the default split (``SPLITS``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; valid: {', '.join(SPLITS)}")
    images, labels = digits_uint8(image_size)
    index = torch.from_numpy(digits_split()[split])
    return images[index], labels[index]
