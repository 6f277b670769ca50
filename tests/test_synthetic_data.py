"""`data=synthetic`: random 8-bit images of any shape, fixed by a seed, with no disk reads."""

from __future__ import annotations

import builtins
import inspect
import io
import math
import os
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

import diffusion  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from diffusion.data import image_data as D

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "data" / "synthetic.yaml"
LOADER_KW = dict(num_workers=0, pin_memory=False)


def make(**kwargs) -> D.SyntheticData:
    defaults = dict(image_size=8, channels=3, num_classes=10, train_size=64, val_size=20,
                    test_size=30, batch_size=16, **LOADER_KW)
    data = D.SyntheticData(**{**defaults, **kwargs})
    data.setup()
    return data


def everything(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.parametrize("image_size, channels, num_classes", [(8, 3, 10), (5, 1, None), (16, 4, 1000)])
def test_any_shape_and_class_count(image_size, channels, num_classes):
    data = make(image_size=image_size, channels=channels, num_classes=num_classes)
    assert (data.image_size, data.channels, data.num_classes) == (image_size, channels, num_classes)
    assert [len(s) for s in (data.train_set, data.val_set, data.test_set)] == [64, 20, 30]
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (16, channels, image_size, image_size) and images.dtype == torch.float32
    assert labels.shape == (16,) and labels.dtype == torch.int64
    test_images, test_labels = everything(data.test_set)
    if num_classes is None:
        assert (test_labels == 0).all()
    else:
        assert test_labels.min() >= 0 and test_labels.max() < num_classes
        assert len(test_labels.unique()) > 1


def test_pixels_are_8_bit_levels_in_the_model_range():
    images, _ = everything(make(test_size=64).test_set)
    levels = (images.double() + 1) * 127.5  # 2k/255 - 1 -> k
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert images.min() == -1 and images.max() == 1  # both ends of 0..255 occur in 12k pixels


def test_pixels_are_uniform_over_the_256_levels():
    """Their entropy is 8 bits/dim (the floor of any bits/dim on them): the plug-in estimate
    from n = 49152 pixels falls short of 8 by about (256 - 1) / (2 n ln 2) = 0.0037 bits."""
    images, _ = everything(make(image_size=16, channels=3, test_size=64).test_set)
    counts = torch.bincount(((images + 1) * 127.5).round().long().flatten(), minlength=256).double()
    p = counts / counts.sum()
    entropy = -(p * p.log2()).sum().item()
    n = counts.sum().item()
    assert entropy == pytest.approx(8 - 255 / (2 * n * math.log(2)), abs=0.003)


def test_the_seed_fixes_every_image_in_any_order_and_worker():
    a, b, other = make(seed=3), make(seed=3), make(seed=4)
    for split in ("train_set", "val_set", "test_set"):
        images, labels = everything(getattr(a, split))
        same_images, same_labels = everything(getattr(b, split))
        assert torch.equal(images, same_images) and torch.equal(labels, same_labels)
        assert not torch.equal(images, everything(getattr(other, split))[0])
    # the splits are different images, and an item does not depend on what was drawn before
    assert not torch.equal(a.val_set[0][0], a.test_set[0][0])
    backwards = [a.test_set[i][0] for i in reversed(range(len(a.test_set)))][::-1]
    assert torch.equal(torch.stack(backwards), everything(a.test_set)[0])
    # two worker processes draw the same batches as the main process
    serial = list(a.test_dataloader())
    a.num_workers = 2
    for (x, y), (x2, y2) in zip(serial, a.test_dataloader(), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_the_global_random_state_is_neither_read_nor_advanced():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = make().train_set[5][0]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)
    assert torch.equal(make().train_set[5][0], first)


def test_nothing_is_read_from_disk(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a file was opened: {args[:1]}")

    for owner, name in ((builtins, "open"), (io, "open"), (os, "open")):
        monkeypatch.setattr(owner, name, refuse)
    data = make()
    next(iter(data.train_dataloader()))
    next(iter(data.test_dataloader()))


@pytest.mark.parametrize("bad", [dict(image_size=0), dict(channels=-1), dict(num_classes=0), dict(test_size=0)])
def test_sizes_must_be_positive(bad):
    with pytest.raises(ValueError, match="must be positive integers"):
        D.SyntheticData(**bad)


def test_config_keys_are_the_constructor_arguments_and_default_to_cifar_shape():
    cfg = OmegaConf.load(CONFIG)
    assert set(cfg) - {"_target_"} == set(inspect.signature(get_class(cfg._target_)).parameters)
    data = instantiate(cfg)
    assert (data.image_size, data.channels, data.num_classes) == (32, 3, 10)
    assert data.sizes == (50000, 1000, 10000)


def test_data_synthetic_composes_with_a_preset(compose_cfg):
    cfg = compose_cfg("train", ["experiment=cifar_cosine_learned_sigma", "data=synthetic",
                                "data.num_classes=null", "data.image_size=64"])
    data = instantiate(cfg.data)
    assert isinstance(data, D.SyntheticData) and data.batch_size == 128  # the preset's batch
    assert (data.image_size, data.num_classes) == (64, None)
