"""DataModules on tiny fixtures written in each dataset's real on-disk format; no network."""

from __future__ import annotations

import inspect
import pickle
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_digits

import diffusion  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from diffusion.data import datasets as ds
from diffusion.data import image_data as D

from dataset_files import write_celeba, write_cifar10, write_imagenet64
from fixtures import save_image

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
LOADER_KW = dict(num_workers=0, pin_memory=False)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a host or open a connection fails loudly."""

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def to_model_range(uint8: np.ndarray) -> torch.Tensor:
    """Independent reference for the 8-bit -> [-1, 1] map: k -> 2k/255 - 1."""
    return torch.from_numpy(uint8.astype(np.float64) * 2 / 255 - 1).float()


def assert_batch(images, labels, shape, num_classes):
    assert images.shape == shape and images.dtype == torch.float32
    assert labels.shape == shape[:1] and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    if num_classes is None:
        assert (labels == 0).all()
    else:
        assert labels.min() >= 0 and labels.max() < num_classes


def flip_outcomes(dataset, index, draws=24):
    """How often dataset[index] comes out (unchanged, mirrored) w.r.t. its first draw's frame."""
    torch.manual_seed(0)
    reference, _ = dataset[index]
    samples = [dataset[index][0] for _ in range(draws)]
    same = sum(torch.equal(s, reference) for s in samples)
    mirrored = sum(torch.equal(s, reference.flip(-1)) for s in samples)
    return same, mirrored


# ----------------------------------------------------------------------------- digits
def test_digits_values_labels_and_split_sizes():
    dm = D.DigitsData(batch_size=64)
    dm.setup("fit")
    assert (dm.image_size, dm.channels, dm.num_classes) == (8, 1, 10)
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [1437, 180, 180]
    digits = load_digits()
    expected = np.rint(digits.images * 255 / 16).astype(np.uint8)  # 17 levels -> 8 bits
    rows = {(expected[i].tobytes(), int(digits.target[i])) for i in range(len(expected))}
    for split in (dm.train_set, dm.val_set, dm.test_set):
        images, labels = split.tensors
        levels = (images.double() + 1) * 127.5  # back to 0..255
        torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
        levels = levels.round().to(torch.uint8)
        assert all(
            (levels[i, 0].numpy().tobytes(), int(labels[i])) in rows for i in range(len(labels))
        )
    val_labels, test_labels = dm.val_set.tensors[1], dm.test_set.tensors[1]
    assert torch.bincount(val_labels, minlength=10).min() >= 15  # stratified: ~18 per class
    assert torch.bincount(test_labels, minlength=10).min() >= 15


def test_the_digits_fid_uses_the_training_split_of_the_quickstart():
    """One split: the FID classifier's training part and reference images are exactly the
    quickstart's training images, and its test part the quickstart's test images."""
    from diffusion.data.digits import digits_images

    dm = D.DigitsData()  # the quickstart's data config
    dm.setup()
    for split, part in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set)):
        images, labels = digits_images(split)
        as_uint8 = ((part.tensors[0] + 1) * 127.5).round().to(torch.uint8)
        assert torch.equal(images, as_uint8), split
        assert torch.equal(labels, part.tensors[1]), split


def test_digits_split_is_fixed_and_independent_of_global_rng():
    torch.manual_seed(1)
    np.random.seed(1)
    a = D.DigitsData(split_seed=3)
    a.setup()
    torch.manual_seed(2)
    np.random.seed(2)
    b, c = D.DigitsData(split_seed=3), D.DigitsData(split_seed=4)
    b.setup()
    c.setup()
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    assert not torch.equal(a.val_set.tensors[0], c.val_set.tensors[0])


def test_digits_loaders_shuffle_and_drop_last_only_for_train():
    dm = D.DigitsData(batch_size=100)
    dm.setup()
    assert len(dm.train_dataloader()) == 1437 // 100
    assert len(dm.val_dataloader()) == 2  # 180 images: the last, partial batch is kept
    # The training order is drawn from the run's seed and the epoch (training/resume.py):
    # the same for two loaders of one run, different from one epoch to the next.
    loader = dm.train_dataloader()
    epochs = [[images for images, _ in loader][0] for _ in range(2)]  # two whole epochs
    assert not torch.equal(*epochs)
    assert torch.equal(next(iter(dm.train_dataloader()))[0], epochs[0])
    val = [next(iter(dm.val_dataloader()))[0] for _ in range(2)]
    assert torch.equal(*val) and torch.equal(val[0], dm.val_set.tensors[0][:100])
    images, labels = next(iter(dm.train_dataloader()))
    assert_batch(images, labels, (100, 1, 8, 8), 10)


def test_digits_upscaled_and_loader_options():
    dm = D.DigitsData(image_size=16, batch_size=32)
    dm.setup()
    images, labels = next(iter(dm.test_dataloader()))
    assert_batch(images, labels, (32, 1, 16, 16), 10)
    grid = (images + 1) * 127.5  # still 8-bit values
    torch.testing.assert_close(grid, grid.round(), atol=1e-4, rtol=0)
    workers = D.DigitsData(num_workers=2, pin_memory=True, persistent_workers=True)
    workers.setup()
    loader = workers.train_dataloader()  # not iterated: no worker starts
    assert loader.persistent_workers and loader.pin_memory and loader.num_workers == 2
    assert not dm.train_dataloader().persistent_workers


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(val_fraction=0.0),
        dict(test_fraction=1.2),
        dict(val_fraction=0.6, test_fraction=0.5),
        dict(batch_size=0),
    ],
)
def test_digits_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=str(next(iter(kwargs.values())))):
        D.DigitsData(**kwargs)


def test_a_batch_larger_than_the_train_split_shrinks_to_it_with_a_warning():
    """A first run on a few of one's own images trains (issue "Reliability, round two")."""
    data = D.DigitsData(batch_size=5000)
    with pytest.warns(UserWarning, match="fewer than batch_size=5000: training batches will hold 1437"):
        data.setup()
    assert len(data.train_dataloader()) == 1 and data.train_dataloader().batch_size == 1437
    assert data.test_dataloader().batch_sampler.batch_size == 5000  # evaluation keeps the batch size


# ----------------------------------------------------------------------------- CIFAR-10
@pytest.fixture
def cifar_root(tmp_path):
    entries = write_cifar10(tmp_path / "cifar10")
    return tmp_path / "cifar10", entries


def cifar(root, **kwargs):
    return D.Cifar10Data(
        str(root), **{"val_size": 10, "batch_size": 8, **LOADER_KW, **kwargs}
    )


def test_cifar10_reads_files_without_network(cifar_root, no_network, monkeypatch):
    root, entries = cifar_root

    def no_download(*args, **kwargs):
        raise AssertionError("complete files must not trigger a download")

    monkeypatch.setattr(D.tv_utils, "download_and_extract_archive", no_download)
    dm = cifar(root, download=True)
    dm.prepare_data()
    dm.setup("fit")
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [90, 10, 20]
    images, labels = next(iter(dm.test_dataloader()))
    test = entries["test_batch"]
    expected = to_model_range(test["data"][:8].reshape(8, 3, 32, 32))  # rows are R, G, B planes
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)
    assert labels.tolist() == test["labels"][:8]
    batches = list(dm.train_dataloader())
    assert len(batches) == 90 // 8
    assert_batch(*batches[0], (8, 3, 32, 32), 10)


def test_cifar10_flips_only_training_images(cifar_root):
    root, _ = cifar_root
    dm = cifar(root, download=False)
    dm.setup()
    same, mirrored = flip_outcomes(dm.train_set, 0)
    assert same > 0 and mirrored > 0 and same + mirrored == 24
    for split in (dm.val_set, dm.test_set):
        assert flip_outcomes(split, 0) == (24, 0)
    unflipped = cifar(root, download=False, random_flip=False)
    unflipped.setup()
    assert flip_outcomes(unflipped.train_set, 0) == (24, 0)


def test_cifar10_split_is_fixed(cifar_root):
    root, _ = cifar_root
    torch.manual_seed(5)
    a = cifar(root, download=False)
    a.setup()
    torch.manual_seed(6)
    torch.rand(3)
    b, c = cifar(root, download=False), cifar(root, download=False, split_seed=1)
    b.setup()
    c.setup()
    assert a.val_set.indices == b.val_set.indices and a.train_set.indices == b.train_set.indices
    assert a.val_set.indices != c.val_set.indices
    assert sorted(a.train_set.indices + a.val_set.indices) == list(range(100))


def test_cifar10_missing_batch_names_file_and_folder(cifar_root):
    root, _ = cifar_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as info:
        cifar(root, download=False).setup()
    message = str(info.value)
    assert "data_batch_3" in message and str(root / "cifar-10-batches-py") in message
    assert "data_batch_1" not in message.split("lacks")[1].split("(")[0]  # only what is missing
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message


def test_cifar10_failed_download_explains_where_and_how(tmp_path, no_network):
    dm = cifar(tmp_path / "nothing_here", download=True)
    with pytest.raises(RuntimeError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / "nothing_here" / "cifar-10-batches-py") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message and "download" in message


def test_cifar10_unreadable_batch_is_reported(cifar_root):
    root, _ = cifar_root
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match="cifar-10-batches-py"):
        cifar(root, download=False).setup()


# ----------------------------------------------------------------------------- CelebA
def test_celeba_crop_resize_splits_and_no_labels(tmp_path):
    write_celeba(tmp_path / "celeba")
    dm = D.CelebAData(str(tmp_path), batch_size=4, **LOADER_KW)
    dm.setup()
    assert (dm.image_size, dm.channels, dm.num_classes) == (64, 3, None)
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [8, 2, 2]
    images, labels = next(iter(dm.test_dataloader()))
    assert_batch(images, labels, (2, 3, 64, 64), None)
    # Only the white square survives the crop (JPEG ringing aside): a wider crop would
    # bring black borders in, an off-center one a black band on one side.
    assert images.min() > 0.8 and images.mean() > 0.98
    assert_batch(*next(iter(dm.train_dataloader())), (4, 3, 64, 64), None)
    direct = D.CelebAData(str(tmp_path / "celeba"), image_size=32, batch_size=4, **LOADER_KW)
    direct.setup()  # root may also be the celeba folder itself
    assert direct.test_set[0][0].shape == (3, 32, 32)


def test_celeba_flips_only_training_images(tmp_path):
    write_celeba(tmp_path / "celeba")
    pixels = np.zeros((218, 178, 3), np.uint8)
    pixels[:, :89] = 255  # left half white: a flip is visible
    for name in ("000001.jpg", "000002.jpg"):  # the first train and the first valid image
        Image.fromarray(pixels).save(tmp_path / "celeba" / "img_align_celeba" / name, quality=95)
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text(
        "000001.jpg 0\n"
        + "".join(f"{k:06d}.jpg {k % 2 + 1 if k < 5 else 0}\n" for k in range(2, 13))
    )
    dm = D.CelebAData(str(tmp_path), batch_size=2, **LOADER_KW)
    dm.setup()
    same, mirrored = flip_outcomes(dm.train_set, 0)
    assert same > 0 and mirrored > 0
    assert flip_outcomes(dm.val_set, 0) == (24, 0)
    left_white = D.CelebAData(str(tmp_path), batch_size=2, random_flip=False, **LOADER_KW)
    left_white.setup()
    assert flip_outcomes(left_white.train_set, 0) == (24, 0)


def test_celeba_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt") as info:
        D.CelebAData(str(tmp_path / "absent"), **LOADER_KW).setup()
    assert str(tmp_path / "absent") in str(info.value)
    write_celeba(tmp_path / "celeba")
    (tmp_path / "celeba" / "img_align_celeba" / "000011.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000011.jpg"):
        D.CelebAData(str(tmp_path), batch_size=2, **LOADER_KW).setup()


# ----------------------------------------------------------------------------- ImageNet 64x64
def imagenet(root, **kwargs):
    return D.ImageNet64Data(
        str(root), **{"val_size": 10, "batch_size": 4, **LOADER_KW, **kwargs}
    )


def test_imagenet64_reads_npz_batches(tmp_path):
    arrays = write_imagenet64(tmp_path / "in64")
    dm = imagenet(tmp_path / "in64")
    dm.setup()
    assert (dm.image_size, dm.channels, dm.num_classes) == (64, 3, 1000)
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [50, 10, 8]
    images, labels = next(iter(dm.test_dataloader()))
    val = arrays["val_data.npz"]
    torch.testing.assert_close(
        images, to_model_range(val["data"][:4].reshape(4, 3, 64, 64)), atol=1e-6, rtol=0
    )
    assert labels.tolist() == [v - 1 for v in val["labels"][:4]] and labels[:2].tolist() == [0, 999]
    for channel, value in enumerate((10, 20, 30)):  # channel-first planes, not HWC
        assert torch.allclose(images[0, channel], torch.tensor(value * 2 / 255 - 1))
    assert_batch(*next(iter(dm.train_dataloader())), (4, 3, 64, 64), 1000)
    expected = torch.cat(
        [to_model_range(arrays[f"train_data_batch_{k}.npz"]["data"]) for k in range(1, 11)]
    ).view(60, 3, 64, 64)
    for split in (dm.train_set, dm.val_set):  # stored and compressed files read alike
        for i in (0, len(split) - 1):
            torch.testing.assert_close(split[i][0], expected[split.indices[i]], atol=1e-6, rtol=0)


def test_imagenet64_memory_maps_stored_members(tmp_path):
    write_imagenet64(tmp_path / "in64")
    batches = ds.NpzImageBatches(
        [tmp_path / "in64" / "train_data_batch_1.npz", tmp_path / "in64" / "train_data_batch_9.npz"]
    )
    stored, compressed = batches.pixels(0), batches.pixels(1)
    assert isinstance(stored, np.memmap) and not isinstance(compressed, np.memmap)
    with np.load(tmp_path / "in64" / "train_data_batch_1.npz") as npz:
        np.testing.assert_array_equal(stored, npz["data"])
    assert len(pickle.dumps(batches)) < 10_000  # workers get paths and labels, not pixels


def test_imagenet64_flips_only_training_images(tmp_path):
    write_imagenet64(tmp_path / "in64")
    dm = imagenet(tmp_path / "in64", random_flip=True)
    dm.setup()
    same, mirrored = flip_outcomes(dm.train_set, 0)
    assert same > 0 and mirrored > 0
    assert flip_outcomes(dm.val_set, 0) == (24, 0) and flip_outcomes(dm.test_set, 1) == (24, 0)
    plain = imagenet(tmp_path / "in64")
    plain.setup()
    assert flip_outcomes(plain.train_set, 0) == (24, 0)
    assert plain.val_set.indices == dm.val_set.indices  # fixed split


def test_imagenet64_sub_folders_and_missing_files(tmp_path):
    root = tmp_path / "in64"
    write_imagenet64(root)
    (root / "Imagenet64_val_npz").mkdir()
    shutil.move(root / "val_data.npz", root / "Imagenet64_val_npz" / "val_data.npz")
    dm = imagenet(root)
    dm.setup()
    assert len(dm.test_set) == 8
    (root / "train_data_batch_7.npz").unlink()
    with pytest.raises(FileNotFoundError) as info:
        imagenet(root).setup()
    message = str(info.value)
    assert str(root) in message and "lacks train_data_batch_7.npz;" in message
    assert "train_data_batch_10.npz" in message and "val_data.npz" in message  # expected names


def test_imagenet64_wrong_keys_and_shapes_name_the_file(tmp_path):
    root = tmp_path / "in64"
    write_imagenet64(root)
    np.savez(
        root / "train_data_batch_2.npz",
        images=np.zeros((6, 12288), np.uint8),
        labels=np.ones(6, np.int64),
    )
    with pytest.raises(
        ValueError, match="train_data_batch_2.npz: expected keys 'data' and 'labels'"
    ):
        imagenet(root).setup()
    np.savez(
        root / "train_data_batch_2.npz",
        data=np.zeros((6, 64, 64, 3), np.uint8),
        labels=np.ones(6, np.int64),
    )
    with pytest.raises(
        ValueError, match=r"train_data_batch_2.npz: expected 'data' of shape \(N, 12288\)"
    ):
        imagenet(root).setup()
    np.savez(
        root / "train_data_batch_2.npz",
        data=np.zeros((6, 12288), np.uint8),
        labels=np.zeros(6, np.int64),
    )
    with pytest.raises(ValueError, match="train_data_batch_2.npz: expected labels in 1..1000"):
        imagenet(root).setup()


# ----------------------------------------------------------------------------- image folders
@pytest.fixture
def class_tree(tmp_path):
    root = tmp_path / "tree"
    for cls, count in (("cat", 6), ("dog", 5)):
        for k in range(count):
            save_image(root / cls / f"{k}.png", mode=("RGB", "L", "RGBA")[k % 3])
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return root


def folder(root, **kwargs):
    return D.ImageFolderData(
        str(root),
        **{
            "image_size": 16,
            "batch_size": 4,
            "val_fraction": 0.2,
            "test_fraction": 0.2,
            **LOADER_KW,
            **kwargs,
        },
    )


def all_items(dm):
    """(path, label) of every item in the three splits."""
    return [
        (split.base.samples[i][0], split[k][1])
        for split in (dm.train_set, dm.val_set, dm.test_set)
        for k, i in enumerate(split.indices)
    ]


def test_image_folder_subfolders_skip_bad_file_with_warning(class_tree):
    dm = folder(class_tree)
    assert dm.label_mode == "subfolders" and dm.num_classes == 2
    with pytest.warns(UserWarning, match="broken.png"):
        dm.setup()
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [7, 2, 2]
    assert all(
        label == ("cat", "dog").index(Path(path).parent.name) for path, label in all_items(dm)
    )
    images, labels = next(iter(dm.test_dataloader()))
    assert_batch(images, labels, (2, 3, 16, 16), 2)
    assert (images == 1).all()  # grey and RGBA files come out RGB; the crop keeps the center
    assert_batch(*next(iter(dm.train_dataloader())), (4, 3, 16, 16), 2)
    with pytest.raises(RuntimeError, match="broken.png"):
        folder(class_tree, on_bad_image="raise").setup()


def test_image_folder_flat_prefix_labels_and_resize(tmp_path):
    root = tmp_path / "flat"
    for name in ("cat_001", "cat_002", "cat_003", "dog_001", "dog_002", "emu_x_1"):
        save_image(root / f"{name}.png")
    save_image(root / "nested" / "dog_big.jpg", width=96, height=32)  # shorter side 32 -> 16
    dm = folder(root, val_fraction=0.15, test_fraction=0.15)
    assert dm.label_mode == "prefix" and dm.classes == ["cat", "dog", "emu"]
    dm.setup()
    items = all_items(dm)
    assert len(items) == 7
    assert all(label == dm.classes.index(Path(p).name.split("_")[0]) for p, label in items)
    image = next(
        split[k][0]
        for split in (dm.train_set, dm.val_set, dm.test_set)
        for k, i in enumerate(split.indices)
        if split.base.samples[i][0].endswith("big.jpg")
    )
    assert image.shape == (3, 16, 16) and image.mean() > 0.9  # resized whole, then cropped


def test_image_folder_label_modes(tmp_path, class_tree):
    none = folder(class_tree, labels="none")
    assert none.num_classes is None
    with pytest.warns(UserWarning):
        none.setup()
    assert len(all_items(none)) == 11 and all(label == 0 for _, label in all_items(none))
    plain = tmp_path / "plain"
    for k in range(6):
        save_image(plain / f"img{k}.png")
    assert folder(plain).label_mode == "none"
    with pytest.raises(ValueError, match="no sub-folders"):
        folder(plain, labels="subfolders").label_mode  # noqa: B018
    with pytest.raises(ValueError, match="'subfolders', 'prefix', 'none'"):
        folder(plain, labels="filenames")
    with pytest.raises(ValueError, match="on_bad_image='ignore'"):
        folder(plain, on_bad_image="ignore")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        folder(tmp_path / "missing").setup()


def test_image_folder_flips_only_training_images(tmp_path):
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, :8] = 255  # left half white: a flip is visible
    for k in range(10):
        (tmp_path / "faces").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "faces" / f"{k}.png")
    dm = folder(tmp_path / "faces")
    dm.setup()
    same, mirrored = flip_outcomes(dm.train_set, 0)
    assert same > 0 and mirrored > 0
    assert flip_outcomes(dm.val_set, 0) == (24, 0) and flip_outcomes(dm.test_set, 0) == (24, 0)
    plain = folder(tmp_path / "faces", random_flip=False)
    plain.setup()
    assert flip_outcomes(plain.train_set, 0) == (24, 0)


def test_image_folder_split_is_fixed(class_tree):
    with pytest.warns(UserWarning):
        splits = []
        for seed in (0, 0, 1):
            torch.manual_seed(len(splits))
            dm = folder(class_tree, split_seed=seed)
            dm.setup()
            splits.append(dm.val_set.indices + dm.test_set.indices)
    assert splits[0] == splits[1] and splits[0] != splits[2]


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["digits", "cifar10", "celeba", "imagenet64", "image_folder"])
def test_config_keys_are_the_constructor_arguments(name):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cls = get_class(cfg._target_)
    parameters = set(inspect.signature(cls).parameters)
    assert set(cfg) - {"_target_"} == parameters
    dm = instantiate(cfg)  # constructors touch no files
    assert isinstance(dm, D.ImageData) and dm.batch_size == 128
