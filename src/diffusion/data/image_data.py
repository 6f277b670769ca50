"""The datasets of ``configs/data/``: their splits and loaders, in plain torch.

Every class has ``image_size``, ``channels`` and ``num_classes`` (None without labels), and
its loaders yield ``(images, labels)``: images float32 (B, C, H, W) in [-1, 1], the 8-bit
value k mapped to 2k/255 - 1, so likelihoods are bits/dim on 8-bit data (DDPM sec. 3.3,
arXiv 2006.11239); labels int64, all zero when the dataset has none. Training wraps one in
`diffusion.data.module.DataModule` (Lightning); sampling and evaluation use it directly,
without Lightning.

Splits are fixed: held-out parts are drawn with a seed of their own (``split_seed``), never
from the global RNG, so two runs (or a run and its evaluation) see the same images. Training
batches are shuffled, flipped where the dataset allows it, and ``drop_last``; validation and
test batches are neither shuffled nor flipped, and under DDP each process evaluates its
share of them, every image once (`diffusion.data.loader.ShardedBatches`).
"""

from __future__ import annotations

import abc
import os
import pickle
import warnings
from functools import cached_property
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import CIFAR10
from torchvision.datasets import utils as tv_utils
from torchvision.transforms import InterpolationMode, v2

from diffusion.data import datasets as ds
from diffusion.data.digits import digits_split, digits_uint8
from diffusion.data.loader import ResumableDataLoader, ShardedBatches


class ImageData(abc.ABC):
    """Loader plumbing shared by the datasets: subclasses build the splits in ``build_splits``
    (and fetch missing files in ``prepare_data``, which training runs on one process only)."""

    image_size: int
    channels: int
    num_classes: int | None

    def __init__(self, *, batch_size: int, num_workers: int, pin_memory: bool,
                 persistent_workers: bool):
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size={batch_size} must be ≥ 1 and num_workers={num_workers} ≥ 0")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @abc.abstractmethod
    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        """(train, val, test) datasets; each subclass says how."""

    def prepare_data(self) -> None:  # noqa: B027  (a hook: most datasets have nothing to fetch)
        """Fetch what is missing (a download); nothing for most datasets."""

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return  # all three splits are built at once, whatever the stage
        train, val, test = self.build_splits()
        if len(train) == 0:
            raise ValueError("the training split is empty: the dataset has no images to train on")
        if len(train) < self.batch_size:
            # A first run on a few of one's own images should train, not fail on the default.
            warnings.warn(f"the training split has {len(train)} images, fewer than batch_size="
                          f"{self.batch_size}: training batches will hold {len(train)} (set "
                          f"data.batch_size={len(train)} or less to choose)", stacklevel=2)
        self.train_batch_size = min(self.batch_size, len(train))
        self.train_set, self.val_set, self.test_set = train, val, test
        # The shuffling seed: the run's seed (set by seed_everything before set-up).
        self.shuffle_seed = torch.initial_seed()

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def _loader(self, dataset: Dataset | None, *, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before asking for dataloaders")
        options = dict(batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
                       persistent_workers=self.persistent_workers and self.num_workers > 0)
        if train:
            # The order is drawn from the run's seed and resumes mid-epoch (training/resume.py).
            return ResumableDataLoader(dataset, seed=self.shuffle_seed, **{**options, "batch_size": self.train_batch_size})
        # In order, every image once; under torch.distributed each rank takes its share.
        batch_size = options.pop("batch_size")
        return DataLoader(dataset, batch_sampler=ShardedBatches(len(dataset), batch_size), **options)


class DigitsData(ImageData):
    """scikit-learn's 1797 handwritten digits (8x8, values 0..16, labels 0..9), held in memory.

    The 17 grey levels become 8-bit intensities round(v·255/16), and likelihoods are reported
    on that 8-bit version. ``image_size`` other than 8 resizes those uint8 images once
    (bilinear, antialiased). No flips: a mirrored digit is another symbol. The test and
    validation parts are stratified by label: `diffusion.data.digits.digits_split`, the split
    the digits FID uses too.
    """

    channels = 1
    num_classes = 10

    def __init__(self, *, image_size: int = 8, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, split_seed: int = 0, batch_size: int = 128,
                 num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False):
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers)
        _check_fractions(val_fraction, test_fraction)
        if image_size < 1:
            raise ValueError(f"image_size={image_size} must be a positive number of pixels")
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        pixels, labels = digits_uint8(self.image_size)
        images = pixels.float() / 127.5 - 1  # 8-bit k -> 2k/255 - 1
        parts = digits_split(self.val_fraction, self.test_fraction, self.split_seed)
        return tuple(TensorDataset(images[parts[name]], labels[parts[name]]) for name in ("train", "val", "test"))


CIFAR10_HELP = (
    "To get it, run with download=true on a machine with internet access, or fetch "
    "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) and extract it into "
    "{root}, so that {folder} holds data_batch_1..5, test_batch and batches.meta."
)


class Cifar10Data(ImageData):
    """CIFAR-10 in torchvision's on-disk format (``root/cifar-10-batches-py`` pickles).

    Validation is a fixed held-out subset of ``val_size`` training images; test is the
    official test batch. Training images are flipped horizontally when ``random_flip``
    (DDPM, Ho et al. 2020, appendix B). Files are checked for presence, not md5
    (``datasets.CIFAR10Files`` says why).
    """

    image_size = 32
    channels = 3
    num_classes = 10

    def __init__(self, root: str = "data/cifar10", *, download: bool = True,
                 random_flip: bool = True, val_size: int = 1000, split_seed: int = 0,
                 batch_size: int = 128, num_workers: int = 4, pin_memory: bool = False,
                 persistent_workers: bool = True):
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers)
        self.root = Path(root)
        self.folder = self.root / CIFAR10.base_folder
        self.download, self.random_flip = download, random_flip
        self.val_size, self.split_seed = val_size, split_seed

    def missing_files(self) -> list[str]:
        return [name for name in ds.cifar10_file_names() if not (self.folder / name).is_file()]

    def prepare_data(self) -> None:
        """Download (rank 0 only, under Lightning) when files are missing and download is on."""
        missing = self.missing_files()
        if not missing or not self.download:
            return
        try:
            tv_utils.download_and_extract_archive(CIFAR10.url, str(self.root),
                                                  filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        except Exception as err:  # URLError, HTTPError, md5 mismatch, a broken archive ...
            help_text = CIFAR10_HELP.format(root=self.root, folder=self.folder)
            raise RuntimeError(f"CIFAR-10 is missing from {self.folder} ({', '.join(missing)}) "
                               f"and downloading it failed: {err!r}. {help_text}") from err

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        self.prepare_data()
        missing = self.missing_files()
        if missing:
            help_text = CIFAR10_HELP.format(root=self.root, folder=self.folder)
            raise FileNotFoundError(f"CIFAR-10 not found: {self.folder} lacks "
                                    f"{', '.join(missing)} (download={self.download}). {help_text}")
        train, test = self._read(train=True), self._read(train=False)
        train_idx, val_idx = ds.split_indices(len(train), [self.val_size], self.split_seed)
        plain = ds.image_transform()
        return (ds.TransformedSubset(train, train_idx, ds.image_transform(flip=self.random_flip)),
                ds.TransformedSubset(train, val_idx, plain),
                ds.TransformedSubset(test, None, plain))

    def _read(self, *, train: bool) -> CIFAR10:
        try:
            return ds.CIFAR10Files(str(self.root), train=train)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, OSError) as err:
            raise RuntimeError(f"cannot read the CIFAR-10 batches in {self.folder}: torchvision "
                               f"expects pickled dicts with 'data' (N, 3072) uint8 and 'labels' "
                               f"({err!r})") from err


class CelebAData(ImageData):
    """CelebA's aligned 178x218 faces, center-cropped to ``crop_size`` then resized.

    The 140-pixel center crop then resize to 64 follows NCSN and score_sde (Song & Ermon 2019,
    arXiv 1907.05600; Song et al. 2021, arXiv 2011.13456, CelebA ``central_crop(img, 140)``).
    DDIM's released code (arXiv 2010.02502) instead crops rows 57:185 and columns 25:153
    (128 px, off-center), so its FIDs are not directly comparable with this crop.
    Splits are the official train/valid/test of ``list_eval_partition.txt``. No labels.
    ``root`` may be torchvision's root (holding ``celeba/``) or that ``celeba`` folder itself.
    """

    channels = 3
    num_classes = None

    def __init__(self, root: str = "data/celeba", *, image_size: int = 64, crop_size: int = 140,
                 random_flip: bool = True, batch_size: int = 128, num_workers: int = 8,
                 pin_memory: bool = False, persistent_workers: bool = True):
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers)
        if not 1 <= crop_size <= 178 or image_size < 1:
            raise ValueError(f"crop_size={crop_size} must lie in 1..178 (the aligned images are "
                             f"178 wide) and image_size={image_size} be ≥ 1")
        self.root = Path(root)
        self.image_size, self.crop_size, self.random_flip = image_size, crop_size, random_flip

    @property
    def folder(self) -> Path:
        """The folder holding img_align_celeba/ and list_eval_partition.txt."""
        return self.root if (self.root / "img_align_celeba").is_dir() else self.root / "celeba"

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        self._check_files()
        geometric = [v2.CenterCrop(self.crop_size), v2.Resize(self.image_size, antialias=True)]
        train_tf = ds.image_transform(*geometric, flip=self.random_flip)
        eval_tf = ds.image_transform(*geometric)
        return tuple(ds.TransformedSubset(ds.CelebAImages(self.folder, split), None, tf)
                     for split, tf in (("train", train_tf), ("valid", eval_tf), ("test", eval_tf)))

    def _check_files(self) -> None:
        folder = self.folder
        partition_file = folder / "list_eval_partition.txt"
        image_dir = folder / "img_align_celeba"
        help_text = ("Get img_align_celeba.zip and list_eval_partition.txt from "
                     "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (or run "
                     "torchvision.datasets.CelebA(root, download=True)) and put them there.")
        if not partition_file.is_file() or not image_dir.is_dir():
            raise FileNotFoundError(f"CelebA not found: expected {image_dir}/ and {partition_file} "
                                    f"(root={self.root}). {help_text}")
        present = set(os.listdir(image_dir))
        absent = [n for n, _ in ds.read_celeba_partition(partition_file) if n not in present]
        if absent:
            raise FileNotFoundError(f"{len(absent)} images listed in {partition_file} are missing "
                                    f"from {image_dir}, e.g. {absent[:5]}. {help_text}")


IMAGENET64_TRAIN_FILES = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
IMAGENET64_TEST_FILE = "val_data.npz"


class ImageNet64Data(ImageData):
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017, arXiv 1707.08819), npz batches.

    ``root`` (or its immediate sub-folders, as the two train zips unpack) holds
    train_data_batch_1..10.npz and val_data.npz. Validation is a fixed held-out subset of
    ``val_size`` training images; test is the official validation set (val_data.npz), the
    split on which ImageNet 64x64 likelihoods are usually reported. No flips by default: improved-diffusion's loader has none.
    Labels 1..1000 become 0..999.
    """

    image_size = 64
    channels = 3
    num_classes = 1000

    def __init__(self, root: str = "data/imagenet64", *, random_flip: bool = False,
                 val_size: int = 10000, split_seed: int = 0, batch_size: int = 128,
                 num_workers: int = 8, pin_memory: bool = False, persistent_workers: bool = True):
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers)
        self.root = Path(root)
        self.random_flip, self.val_size, self.split_seed = random_flip, val_size, split_seed

    def find_files(self) -> tuple[list[Path], Path]:
        """Paths of the ten train batches and the validation file; errors name what is missing."""
        names = [*IMAGENET64_TRAIN_FILES, IMAGENET64_TEST_FILE]
        found = {n: sorted([*self.root.glob(n), *self.root.glob(f"*/{n}")]) for n in names}
        missing = [n for n in names if not found[n]]
        if missing:
            raise FileNotFoundError(
                f"ImageNet 64x64 not found: {self.root} (or a sub-folder) lacks {', '.join(missing)}; "
                f"expected {', '.join(names)}. Get Imagenet64_train_part1_npz.zip, "
                f"Imagenet64_train_part2_npz.zip and Imagenet64_val_npz.zip from "
                f"https://image-net.org/download-images.php and unzip them into {self.root}.")
        repeated = {n: [str(p) for p in paths] for n, paths in found.items() if len(paths) > 1}
        if repeated:
            raise ValueError(f"ImageNet 64x64 files found more than once under {self.root}: {repeated}")
        return [found[n][0] for n in IMAGENET64_TRAIN_FILES], found[IMAGENET64_TEST_FILE][0]

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        train_paths, test_path = self.find_files()
        train, test = ds.NpzImageBatches(train_paths), ds.NpzImageBatches([test_path])
        train_idx, val_idx = ds.split_indices(len(train), [self.val_size], self.split_seed)
        plain = ds.image_transform()
        return (ds.TransformedSubset(train, train_idx, ds.image_transform(flip=self.random_flip)),
                ds.TransformedSubset(train, val_idx, plain),
                ds.TransformedSubset(test, None, plain))


class ImageFolderData(ImageData):
    """Any folder of images, as RGB: shorter side resized to ``image_size`` (bicubic,
    antialiased), then center-cropped to a square, as improved-diffusion's image_datasets.py.

    ``labels``: ``subfolders`` (torchvision ImageFolder: one class per sub-folder), ``prefix``
    (``cat_001.png`` -> class "cat", files anywhere below root, improved-diffusion's
    convention), ``none``, or ``auto`` (sub-folders when root holds sub-folders and no images
    of its own, else prefixes when every file has one and there are at least two, else none). Every file is checked with PIL's
    ``verify`` at setup; an unreadable one is skipped with a warning naming it, or raises
    (``on_bad_image``). Validation and test are fixed seeded fractions of the images.
    """

    channels = 3

    def __init__(self, root: str = "data/images", *, image_size: int = 64, labels: str = "auto",
                 random_flip: bool = True, on_bad_image: str = "skip", val_fraction: float = 0.05,
                 test_fraction: float = 0.05, split_seed: int = 0, batch_size: int = 128,
                 num_workers: int = 8, pin_memory: bool = False, persistent_workers: bool = True):
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers)
        _check_choice("labels", labels, ds.LABEL_MODES)
        _check_choice("on_bad_image", on_bad_image, ds.BAD_IMAGE_POLICIES)
        _check_fractions(val_fraction, test_fraction)
        if image_size < 1:
            raise ValueError(f"image_size={image_size} must be a positive number of pixels")
        self.root = Path(root)
        self.image_size, self.labels, self.random_flip = image_size, labels, random_flip
        self.on_bad_image = on_bad_image
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed

    @cached_property
    def label_mode(self) -> str:
        """``labels`` with ``auto`` resolved from the folder's layout."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (set data.root to a folder of images)")
        mode = ds.resolve_label_mode(self.root, self.labels)
        if mode == "subfolders" and not ds.has_class_folders(self.root):
            raise ValueError(f"labels=subfolders, but {self.root} has no sub-folders; "
                             f"choose one of {ds.LABEL_MODES}")
        return mode

    @cached_property
    def classes(self) -> list[str] | None:
        """Class names (from folder or file names alone; no image is opened), None without labels."""
        return ds.folder_classes(self.root, self.label_mode)

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        folder = ds.open_image_folder(self.root, self.label_mode, self.on_bad_image)
        n = len(folder)
        if n < 3:  # one image each, at least, for training, validation and test
            raise ValueError(f"image folder {self.root} holds {n} readable image(s){ds.skipped_note(folder)}; "
                             f"training needs at least 3 (one each for training, validation and test) "
                             f"of the types {', '.join(ds.IMG_EXTENSIONS)}, at any depth")
        held_out = [max(1, round(f * n)) for f in (self.val_fraction, self.test_fraction)]
        train_idx, val_idx, test_idx = ds.split_indices(n, held_out, self.split_seed)
        geometric = [v2.Resize(self.image_size, interpolation=InterpolationMode.BICUBIC,
                               antialias=True), v2.CenterCrop(self.image_size)]
        train_tf = ds.image_transform(*geometric, flip=self.random_flip)
        eval_tf = ds.image_transform(*geometric)
        return (ds.TransformedSubset(folder, train_idx, train_tf),
                ds.TransformedSubset(folder, val_idx, eval_tf),
                ds.TransformedSubset(folder, test_idx, eval_tf))


class SyntheticData(ImageData):
    """Random 8-bit images of any shape, made on the fly: no download, no disk reads.

    For measuring and testing the machinery (throughput, memory, a GPU's or a cluster's
    set-up) at a real dataset's shape, CIFAR-10's by default. Each split is
    `datasets.RandomImages` seeded with (``seed``, split number), so every image is fixed
    by the seed; pixels are uniform over the 256 levels (exactly 8 bits/dim of entropy, a
    floor for any bits/dim reported on them) and labels uniform over ``num_classes``
    (None: unlabelled, labels 0).
    """

    def __init__(self, *, image_size: int = 32, channels: int = 3, num_classes: int | None = 10,
                 train_size: int = 50000, val_size: int = 1000, test_size: int = 10000,
                 seed: int = 0, batch_size: int = 128, num_workers: int = 0,
                 pin_memory: bool = False, persistent_workers: bool = False):
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers)
        sizes = {"image_size": image_size, "channels": channels, "train_size": train_size,
                 "val_size": val_size, "test_size": test_size}
        if num_classes is not None:
            sizes["num_classes"] = num_classes
        wrong = [f"{name}={value}" for name, value in sizes.items() if not isinstance(value, int) or value < 1]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: must be positive integers (num_classes may be null)")
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.sizes, self.seed = (train_size, val_size, test_size), seed

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        shape = (self.channels, self.image_size, self.image_size)
        return tuple(ds.RandomImages(n, shape, self.num_classes, entropy=(self.seed, split))
                     for split, n in enumerate(self.sizes))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must lie "
                         f"in (0, 1) and sum to less than 1")
