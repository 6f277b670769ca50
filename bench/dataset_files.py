"""Writers of tiny datasets in each dataset's real on-disk format (no network, no downloads).

Each writer lays files out exactly as the official archive unpacks, so that the datasets of
`diffusion.data` read them through the same code path as the real data:

| writer               | layout under its folder                                                |
|----------------------|------------------------------------------------------------------------|
| `write_cifar10`      | cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} pickles |
| `write_celeba`       | img_align_celeba/*.jpg (178x218) + list_eval_partition.txt              |
| `write_imagenet64`   | train_data_batch_1..10.npz + val_data.npz ('data' (N, 12288), 'labels') |
| `write_image_folder` | one sub-folder of PNGs per class                                        |

The one home of these writers: bench/loader_rate.py times the real loaders on their files,
and the tests (through tests/fixtures.py, with bench/ on pytest's ``pythonpath``) check what
the datasets read and train every experiment preset on them. Only numpy and PIL here, so
that importing a writer never imports torchvision or Lightning.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_LABEL_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def write_cifar10(root: Path, n: int = 20) -> dict[str, dict]:
    """cifar-10-batches-py as the official archive unpacks: pickled dicts, 'data' (n, 3072)
    uint8 rows of R, G, B planes, 'labels' 0..9; ``n`` images per batch file.

    Returns the dict written to each batch file, by file name.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        entries[name] = {
            "batch_label": f"{name} of fixture",
            "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{k}.png" for k in range(n)],
        }
        # Python 2 wrote these keys as byte strings; torchvision's latin1 decoding makes str.
        (folder / name).write_bytes(pickle.dumps(entries[name], protocol=2))
    meta = {"num_cases_per_batch": n, "num_vis": 3072, "label_names": CIFAR10_LABEL_NAMES}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return entries


def write_celeba(folder: Path, partitions: Sequence[int] = (0,) * 8 + (1,) * 2 + (2,) * 2) -> None:
    """celeba/img_align_celeba/*.jpg (178x218) and list_eval_partition.txt (0 train, 1 valid,
    2 test, one entry per image); each image is black but for a white 140x140 square exactly
    where the center crop falls. ``folder`` is the ``celeba`` folder itself."""
    images = folder / "img_align_celeba"
    images.mkdir(parents=True)
    pixels = np.zeros((218, 178, 3), np.uint8)
    pixels[39:179, 19:159] = 255  # top (218-140)/2, left (178-140)/2
    lines = []
    for k, part in enumerate(partitions, start=1):
        Image.fromarray(pixels).save(images / f"{k:06d}.jpg", quality=95)
        lines.append(f"{k:06d}.jpg {part}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def write_imagenet64(root: Path, n_train: int = 6, n_val: int = 8) -> dict[str, dict]:
    """train_data_batch_1..10.npz and val_data.npz with the real keys: 'data' (N, 12288) uint8
    of R, G, B planes, 'labels' 1..1000, and 'mean' in the train batches. Batches 9 and 10 are
    compressed (np.savez_compressed), the others stored (np.savez). The first two validation
    labels are 1 and 1000 (both ends), and the first validation image has constant planes
    R=10, G=20, B=30.

    Returns the arrays written to each file, by file name.
    """
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for k in range(1, 12):
        name = f"train_data_batch_{k}.npz" if k <= 10 else "val_data.npz"
        n = n_train if k <= 10 else n_val
        arrays[name] = {
            "data": rng.integers(0, 256, (n, 12288), dtype=np.uint8),
            "labels": rng.integers(1, 1001, n).tolist(),
        }
        if k <= 10:
            arrays[name]["mean"] = arrays[name]["data"].mean(0)
        save = np.savez_compressed if k in (9, 10) else np.savez
        save(root / name, **arrays[name])
    val = arrays["val_data.npz"]
    val["labels"][:2] = [1, 1000]
    val["data"][0] = np.repeat(np.array([10, 20, 30], np.uint8), 64 * 64)  # planes R=10, G=20, B=30
    np.savez(root / "val_data.npz", **val)
    return arrays


def write_image_folder(
    root: Path, image_size: int, classes: Sequence[str] = ("cat", "dog"), per_class: int = 8
) -> None:
    """``root/<class>/<k>.png``: ``per_class`` random RGB images of ``image_size`` pixels per
    class, the sub-folder layout torchvision's ImageFolder reads (labels = sorted class names)."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k}.png")
