"""Dataset readers and transforms behind the DataModules in ``data.py``.

Every dataset here yields ``(image, label)`` with the image still in its stored form (PIL
image or uint8 CHW tensor); ``TransformedSubset`` applies the split's transform, which ends
in ``to_model_range``: uint8 k -> 2k/255 - 1, so the model sees 8-bit data in [-1, 1] and
likelihoods are reported in bits/dim on those 8 bits (DDPM sec. 3.3, arXiv 2006.11239).
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, random_split

# diffusion/__init__.py has already made torchvision importable on a CPU-only torch.
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, pil_loader
from torchvision.transforms import v2

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- transforms
def to_model_range() -> list:
    """uint8 image (PIL or tensor) -> float32 CHW in [-1, 1]: k -> (k/255 - 0.5)/0.5."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=[0.5], std=[0.5])]


def image_transform(*geometric, flip: bool = False) -> v2.Compose:
    """ToImage, the given geometric transforms (on uint8), an optional flip, then [-1, 1]."""
    flips = [v2.RandomHorizontalFlip(p=0.5)] if flip else []
    return v2.Compose([v2.ToImage(), *geometric, *flips, *to_model_range()])


# ----------------------------------------------------------------------------- splits
def split_indices(n: int, held_out: Sequence[int], seed: int) -> list[list[int]]:
    """Partition range(n) into [rest, *held_out] sized parts, fixed by ``seed``.

    ``random_split`` draws from its own generator, so the split neither reads nor advances
    the global RNG: the same seed gives the same split whatever ran before.
    """
    sizes = [n - sum(held_out), *held_out]
    if min(sizes) < 1:
        raise ValueError(f"cannot split {n} items into parts of sizes {sizes}: every part needs ≥ 1")
    parts = random_split(range(n), sizes, generator=torch.Generator().manual_seed(seed))
    return [list(part.indices) for part in parts]


class TransformedSubset(Dataset):
    """Items ``indices`` of ``base`` (all when None) with ``transform`` applied to the image."""

    def __init__(self, base: Dataset, indices: Sequence[int] | None, transform: Callable):
        self.base = base
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[i]]
        return self.transform(image), int(label)


# ----------------------------------------------------------------------------- CIFAR-10
class CIFAR10Files(CIFAR10):
    """torchvision's CIFAR-10 reader, checking that the files are present instead of their md5.

    torchvision pins the official files by md5, so any other bytes (a test fixture, a re-pickled
    copy) read as "not found or corrupted" without naming a file. The DataModule checks
    presence itself (naming each missing file and the folder); the pickles' structure is then
    checked by loading them. The download, when there is one, still verifies the archive's md5.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def cifar10_file_names() -> list[str]:
    """The files torchvision's CIFAR-10 layout keeps in ``root/cifar-10-batches-py``."""
    names = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list]
    return [*names, CIFAR10.meta["filename"]]


# ----------------------------------------------------------------------------- CelebA
CELEBA_PARTITIONS = {"train": 0, "valid": 1, "test": 2}


class CelebAImages(Dataset):
    """One partition of CelebA's aligned images, read from torchvision's on-disk layout.

    ``folder`` is ``root/celeba`` holding ``img_align_celeba/*.jpg`` and
    ``list_eval_partition.txt`` (lines ``000001.jpg 0``; 0 train, 1 valid, 2 test).
    torchvision's ``CelebA`` would also demand (and md5-check) the attribute, identity, box and
    landmark files, which an unconditional model never reads; this reader needs only the two
    things above, so a folder with just the images and the partition file works. Label is 0.
    """

    def __init__(self, folder: str | os.PathLike, split: str):
        self.image_dir = Path(folder) / "img_align_celeba"
        partition = read_celeba_partition(Path(folder) / "list_eval_partition.txt")
        self.files = [name for name, part in partition if part == CELEBA_PARTITIONS[split]]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return pil_loader(self.image_dir / self.files[i]), 0


def read_celeba_partition(path: Path) -> list[tuple[str, int]]:
    """``list_eval_partition.txt`` -> [(file name, partition)]; bad lines name the file and line."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{path}, line {number}: expected '<name>.jpg <0|1|2>', got {line!r}")
        rows.append((fields[0], int(fields[1])))
    return rows


# ----------------------------------------------------------------------------- synthetic
class RandomImages(Dataset):
    """``length`` images of independent, uniformly random 8-bit pixels of shape ``shape``
    (C, H, W), already in the model's range (k -> 2k/255 - 1), with uniform labels in
    0..num_classes-1 (all 0 when ``num_classes`` is None).

    Item i comes from a generator seeded with (``entropy``, i) alone, so it is the same in
    any order, in any DataLoader worker and on any machine, and nothing is read from disk.
    Uniform 8-bit pixels carry exactly 8 bits/dim, so any likelihood bound on them is at
    least 8 bits/dim: a reference for a bits/dim measurement, not data to learn from.
    """

    def __init__(self, length: int, shape: Sequence[int], num_classes: int | None,
                 entropy: Sequence[int]):
        self.length, self.shape, self.num_classes = length, tuple(shape), num_classes
        self.entropy = [int(e) for e in entropy]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is outside 0..{self.length - 1}")
        # 64 bits of seed: 32 would repeat an image within ~10^5 items (birthday bound).
        seed = np.random.SeedSequence([*self.entropy, index]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(seed))
        pixels = torch.randint(0, 256, self.shape, generator=generator, dtype=torch.uint8)
        label = 0 if self.num_classes is None else int(torch.randint(self.num_classes, (), generator=generator))
        return pixels.float() / 127.5 - 1, label  # 8-bit k -> 2k/255 - 1


# ----------------------------------------------------------------------------- ImageNet 64x64
IMAGENET64_SHAPE = (3, 64, 64)  # each row of 'data' is the R, G and B planes, 64x64 each


class NpzImageBatches(Dataset):
    """Downsampled-ImageNet npz batches (Chrabaszcz et al. 2017, arXiv 1707.08819).

    Each file holds ``data`` (N, 12288) uint8, one image per row as three 64x64 planes, and
    ``labels`` 1..1000. Labels are read (and every file's keys and shapes checked) up front;
    pixels are opened on first use, per process: a member stored uncompressed (``np.savez``)
    is memory-mapped in place, so DataLoader workers share the OS page cache; a compressed
    one (``np.savez_compressed``) has to be read whole into that process's memory.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]
        labels = [read_npz_labels(p) for p in self.paths]
        self.offsets = np.cumsum([0, *(len(x) for x in labels)])  # start index of each file
        self.labels = np.concatenate(labels).astype(np.int64) - 1  # 1..1000 -> 0..999
        self._arrays: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        row = np.array(self.pixels(k)[index - self.offsets[k]])  # copy out of the memmap
        image = torch.from_numpy(row).view(IMAGENET64_SHAPE)  # (12288,) -> (3, 64, 64)
        return image, int(self.labels[index])

    def pixels(self, k: int) -> np.ndarray:
        """File k's ``data`` array (N, 12288): a memmap when stored, else loaded once."""
        if k not in self._arrays:
            path = self.paths[k]
            self._arrays[k] = npz_member_memmap(path, "data")
            if self._arrays[k] is None:
                with np.load(path) as npz:
                    self._arrays[k] = npz["data"]
        return self._arrays[k]

    def __getstate__(self) -> dict:
        # Workers reopen the files themselves rather than receive pickled pixel arrays.
        return {**self.__dict__, "_arrays": {}}


def _npz_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header length) of a .npy member, without its data."""
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"{zf.filename}: {member} has .npy format {version}; expected 1.0 or 2.0")
        shape, fortran, dtype = readers[version](f)
        return shape, fortran, dtype, f.tell()


def read_npz_labels(path: Path) -> np.ndarray:
    """Check an ImageNet64 batch's keys and shapes (naming the file) and return its labels."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from err
    with zf:
        members = set(zf.namelist())
        missing = {"data.npy", "labels.npy"} - members
        if missing:
            raise ValueError(f"{path}: expected keys 'data' and 'labels', found {sorted(members)}")
        shape, _, dtype, _ = _npz_header(zf, "data.npy")
    with np.load(path) as npz:
        labels = np.asarray(npz["labels"]).reshape(-1)
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != int(np.prod(IMAGENET64_SHAPE)):
        raise ValueError(f"{path}: expected 'data' of shape (N, 12288) and dtype uint8 "
                         f"(3x64x64 planes per row), found {shape} {dtype}")
    if shape[0] != len(labels) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: expected {shape[0]} integer labels, found {len(labels)} "
                         f"of dtype {labels.dtype}")
    if len(labels) and (labels.min() < 1 or labels.max() > 1000):
        raise ValueError(f"{path}: expected labels in 1..1000, found {labels.min()}..{labels.max()}")
    return labels


def npz_member_memmap(path: Path, key: str) -> np.ndarray | None:
    """A read-only memmap of ``key`` in the .npz at ``path`` if stored uncompressed, else None.

    numpy's np.load ignores mmap_mode for .npz, but a member written without compression is a
    plain .npy byte run inside the zip: it starts after the zip local file header (30 bytes,
    then the name and the extra field, whose lengths sit at bytes 26-29; PKWARE APPNOTE
    4.3.7) and the .npy header.
    """
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        shape, fortran, dtype, npy_header = _npz_header(zf, info.filename)
    if fortran:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    offset = info.header_offset + 30 + name_len + extra_len + npy_header
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


# ----------------------------------------------------------------------------- image folders
LABEL_MODES = ("auto", "subfolders", "prefix", "none")
BAD_IMAGE_POLICIES = ("skip", "raise")


def prefix_label(path: str | os.PathLike) -> str:
    """Class of a file named ``<label>_<anything>.ext``: the text before the first underscore
    (the convention of improved-diffusion's image_datasets.py)."""
    return Path(path).name.split("_", 1)[0]


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files (torchvision's IMG_EXTENSIONS) anywhere under ``root``, sorted."""
    found = []
    for folder, _, names in os.walk(root, followlinks=True):
        found += [os.path.join(folder, n) for n in names if has_file_allowed_extension(n, IMG_EXTENSIONS)]
    return sorted(found)


class ImageVerifier:
    """``is_valid_file`` for ImageFolder: an image extension and a header PIL can verify.

    ``Image.verify`` parses the file without decoding pixels (cheap; PNG chunk CRCs are
    checked), so unreadable files are dropped at setup instead of failing a batch mid-epoch.
    A JPEG truncated inside its pixel data can still pass and fail later.
    """

    def __init__(self, on_bad_image: str):
        self.on_bad_image = on_bad_image
        self.skipped = 0  # unreadable files left out

    def __call__(self, path: str) -> bool:
        if not has_file_allowed_extension(path, IMG_EXTENSIONS):
            return False
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error ...
            message = f"unreadable image {path}: {type(err).__name__}: {err}"
            if self.on_bad_image == "raise":
                raise RuntimeError(f"{message} (set on_bad_image=skip to leave it out)") from err
            warnings.warn(f"skipping {message}", stacklevel=2)
            self.skipped += 1
            return False
        return True


class NamedImageFolder(ImageFolder):
    """Images anywhere under ``root``, labelled by file-name prefix (``cat_001.png`` -> "cat")
    or, with ``use_prefix=False``, all in the one class 0."""

    def __init__(self, root: str | os.PathLike, *, use_prefix: bool, is_valid_file: Callable):
        self.use_prefix = use_prefix
        super().__init__(str(root), is_valid_file=is_valid_file)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        names = {prefix_label(p) for p in list_images(directory)} if self.use_prefix else {""}
        classes = sorted(names)
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False) -> list[tuple[str, int]]:
        label = prefix_label if self.use_prefix else _no_label
        return [(p, class_to_idx[label(p)]) for p in list_images(directory) if is_valid_file(p)]


def _no_label(path: str) -> str:
    return ""


def has_class_folders(root: Path) -> bool:
    return any(entry.is_dir() for entry in os.scandir(root))


def resolve_label_mode(root: Path, labels: str) -> str:
    """``auto``: sub-folders when root holds sub-folders and no images of its own; else
    file-name prefixes when every file has one and they name at least two classes; else none."""
    if labels != "auto":
        return labels
    top_level_images = any(entry.is_file() and has_file_allowed_extension(entry.name, IMG_EXTENSIONS)
                           for entry in os.scandir(root))
    if has_class_folders(root) and not top_level_images:
        return "subfolders"
    names = [Path(p).name for p in list_images(root)]
    prefixes = {prefix_label(n) for n in names}
    if names and all("_" in n for n in names) and len(prefixes) >= 2:
        return "prefix"
    return "none"


def folder_classes(root: Path, mode: str) -> list[str] | None:
    """Class names for ``mode`` from the file and folder names alone (no image is opened)."""
    if mode == "subfolders":
        return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if mode == "prefix":
        return sorted({prefix_label(p) for p in list_images(root)})
    return None


def open_image_folder(root: Path, mode: str, on_bad_image: str) -> ImageFolder:
    """The torchvision ImageFolder for ``mode``, its unreadable files dealt with."""
    verifier = ImageVerifier(on_bad_image)
    if mode == "subfolders":
        folder = ImageFolder(str(root), is_valid_file=verifier, allow_empty=True)
    else:
        folder = NamedImageFolder(root, use_prefix=mode == "prefix", is_valid_file=verifier)
    folder.skipped = verifier.skipped
    return folder


def skipped_note(folder: ImageFolder) -> str:
    """``" (N unreadable files skipped)"`` after `open_image_folder` left some out, else ``""``."""
    skipped = getattr(folder, "skipped", 0)
    return f" ({skipped} unreadable file(s) skipped)" if skipped else ""
