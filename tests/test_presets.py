"""Every experiment preset trains end to end: `fast_dev_run` with a tiny UNet, on data files
written in the dataset's real on-disk format (bench/dataset_files.py), through the same
`diffusion.training.run.train` that train.py calls."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

import diffusion  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from diffusion.training import run

from conftest import EXPERIMENTS, REPO, TINY_UNET
from dataset_files import write_celeba, write_cifar10, write_image_folder, write_imagenet64

# DataModule class -> writer of a tiny copy of its data under the folder given as data.root
# (second argument: the image size the preset asks for). Digits ship with scikit-learn.
WRITERS: dict[str, Callable[[Path, int], object]] = {
    # 16 images per batch file: 80 training images, 16 test images.
    "Cifar10Data": lambda root, size: write_cifar10(root, n=16),
    # data.root holds celeba/ (torchvision's layout): 8 train, 2 valid, 2 test images.
    "CelebAData": lambda root, size: write_celeba(root / "celeba"),
    # 2 images in each of the 10 train batches, 4 in val_data.npz.
    "ImageNet64Data": lambda root, size: write_imagenet64(root, n_train=2, n_val=4),
    "ImageFolderData": lambda root, size: write_image_folder(root, size),
}
IN_MEMORY = {"DigitsData"}

BATCH_SIZE = 4
# The test after fitting (calc_bpd_loop) makes T network calls per test batch, so it is far
# too slow for most presets: over 4000 steps (the IDDPM presets) it takes minutes on a CPU, and
# even at T=1000 it took 70-85 s on 32x32 and 14 s on the 8x8 digits (one thread), against ~1-5 s
# for the whole rest of a run. Presets with more steps than this skip it; the test after
# fitting is covered by test_train.py::test_fast_dev_run (digits, T=50).
MAX_TESTED_STEPS = 100


def data_class(cfg: DictConfig) -> tuple[str, int]:
    """(DataModule class name, image size) of a composed config; CIFAR-10 and ImageNet64
    fix their size as a class attribute rather than a config key."""
    cls = get_class(cfg.data._target_)
    size = cfg.data.get("image_size") or getattr(cls, "image_size", None)
    assert size, f"cannot tell the image size of {cfg.data._target_}"
    return cls.__name__, int(size)


def preset_overrides(cfg: DictConfig, root: Path) -> list[str]:
    """Tiny-UNet, tiny-data, one-batch CPU overrides for the preset composed as ``cfg``."""
    _, size = data_class(cfg)
    overrides = [
        *TINY_UNET,
        # The tiny UNet (channel_mult [1, 2]) runs at size and size/2: attend at the latter.
        f"model.attention_resolutions=[{size // 2}]",
        "+trainer.fast_dev_run=true",
        "trainer.precision=32-true",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        f"data.batch_size={BATCH_SIZE}",
        "data.num_workers=0",
    ]
    optional = {
        "root": str(root),
        "download": "false",  # the fixture is complete: a download attempt is a failure
        "val_size": str(BATCH_SIZE),  # held out of the (tiny) training set
        "persistent_workers": "false",
        "pin_memory": "false",
    }
    overrides += [f"data.{key}={value}" for key, value in optional.items() if key in cfg.data]
    callbacks = cfg.get("callbacks") or {}
    if "progress_bar" in callbacks:
        overrides.append("~callbacks.progress_bar")
    if "sample_grid" in callbacks:
        # The grid is drawn at the end of fit: 64 samples x 20 steps would dominate the run.
        overrides += ["callbacks.sample_grid.num_samples=2", "callbacks.sample_grid.ddim_steps=2"]
    if cfg.diffusion.betas.num_diffusion_timesteps > MAX_TESTED_STEPS:
        overrides.append("test_after_fit=false")
    return overrides


BUILD_MODULE = run.build_module  # the real one, before any test patches it


class Recorder:
    """Wraps `run.build_module` to keep the module and datamodule that `train` builds, and
    records what the UNet receives (labels) and returns (output shape) while training."""

    def __init__(self):
        self.module = self.datamodule = None
        self.calls: list[dict] = []  # one per UNet call in train mode
        self.batches: list[torch.Tensor] = []  # labels of each training batch

    def build_module(self, cfg, datamodule):
        module = BUILD_MODULE(cfg, datamodule)
        self.module, self.datamodule = module, datamodule
        training_step, calls, batches = module.training_step, self.calls, self.batches

        def recording_step(batch, batch_idx):
            batches.append(batch[1].clone())
            return training_step(batch, batch_idx)

        # A plain closure, not a bound method: the EMA callback deep-copies the UNet with
        # its hooks, and a bound method would drag this recorder (and the trainer) along.
        def record(model, args, kwargs, output):
            if model.training:
                y = kwargs.get("y")
                calls.append(dict(y=None if y is None else y.clone(), shape=tuple(output.shape)))

        module.training_step = recording_step
        module.model.register_forward_hook(record, with_kwargs=True)
        return module


def assert_process_as_composed(process, cfg: DictConfig) -> None:
    """The module's process has the composed schedule and every composed setting."""
    betas = instantiate(cfg.diffusion.betas)
    assert process.num_timesteps == len(betas) == cfg.diffusion.betas.num_diffusion_timesteps
    np.testing.assert_allclose(process.betas, betas, rtol=1e-12, atol=0)
    for key, value in cfg.diffusion.items():
        if key in ("_target_", "betas") or not hasattr(process, key):
            continue
        actual = getattr(process, key)
        assert getattr(actual, "value", actual) == value, (key, actual, value)


def assert_module_as_composed(module, cfg: DictConfig) -> None:
    """The module got every composed module setting (t-sampler, warm-up, label dropout ...)."""
    for key, value in cfg.module.items():
        if key not in ("_target_", "optimizer"):
            assert module.hparams[key] == value, (key, module.hparams[key], value)


def assert_labels(recorder: Recorder, cfg: DictConfig) -> None:
    """Class-conditional presets feed the fixture's labels to the UNet; others feed none."""
    module, datamodule = recorder.module, recorder.datamodule
    assert recorder.batches and recorder.calls
    first_call, labels = recorder.calls[0], recorder.batches[0]
    if not cfg.class_cond:
        assert module.num_classes is None and all(c["y"] is None for c in recorder.calls)
        return
    assert module.num_classes == datamodule.num_classes == module.model.num_classes
    assert labels.dtype == torch.int64 and labels.shape == (BATCH_SIZE,)
    received = first_call["y"]
    if getattr(module.hparams, "label_dropout", 0):
        # Classifier-free guidance: some labels are replaced by the UNet's null class.
        assert ((received == labels) | (received == module.model.null_label)).all()
    else:
        assert torch.equal(received, labels)
    assert 0 <= labels.min() and labels.max() < datamodule.num_classes
    # The fixtures' labels are random: all-equal labels would be the no-label placeholder.
    assert labels.unique().numel() > 1, labels


# The super-resolution presets wrap a dataset (data.data) and feed (image, {low_res, y})
# batches: tests/test_superres.py runs each one's network and trains the digits one end to end.
@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if "superres" not in e])
def test_preset_fast_dev_run(compose_cfg, tmp_path, monkeypatch, experiment):
    preset = compose_cfg("train", [f"experiment={experiment}"])
    name, size = data_class(preset)
    root = tmp_path / "data"
    if name not in IN_MEMORY:
        if name not in WRITERS:
            pytest.fail(
                f"preset {experiment!r} trains on {preset.data._target_}, which has no fixture "
                f"writer: add one to bench/dataset_files.py and to WRITERS in tests/test_presets.py"
            )
        WRITERS[name](root, size)
    cfg = compose_cfg("train", [f"experiment={experiment}", *preset_overrides(preset, root)])
    recorder = Recorder()
    monkeypatch.setattr(run, "build_module", recorder.build_module)

    metrics = run.train(cfg)

    assert math.isfinite(metrics["train/loss"]), metrics
    module = recorder.module
    if sum(module.trainer.num_val_batches) > 0:
        assert math.isfinite(metrics["val/bpd"]) and metrics["val/bpd"] > 0, metrics
    if cfg.test_after_fit:
        assert math.isfinite(metrics["test/bpd"]) and metrics["test/bpd"] > 0, metrics
    assert_process_as_composed(module.diffusion, cfg)
    assert_module_as_composed(module, cfg)
    channels = recorder.datamodule.channels
    learned = cfg.diffusion.model_var_type in ("learned", "learned_range")
    assert module.model.out_channels == channels * (2 if learned else 1)
    assert recorder.calls[0]["shape"] == (BATCH_SIZE, module.model.out_channels, size, size)
    assert module.image_shape == (channels, size, size)
    assert_labels(recorder, cfg)


@pytest.mark.slow
def test_train_py_multirun_over_schedules(tmp_path):
    """`train.py -m diffusion/schedule=linear,cosine`: two jobs, each with its own folder
    holding the composed config and the last checkpoint."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "diffusion/schedule=linear,cosine",
        *TINY_UNET,
        "model.attention_resolutions=[4]",
        "data.batch_size=16",
        "~callbacks.progress_bar",
        "callbacks.sample_grid.num_samples=2",  # drawn at the end of fit: keep it tiny
        "callbacks.sample_grid.ddim_steps=2",
        "trainer.max_steps=2",
        "test_after_fit=false",
        f"hydra.sweep.dir={sweep}",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = sorted(sweep.rglob("checkpoints/last.ckpt"))
    assert len(checkpoints) == 2, (checkpoints, result.stderr[-3000:])
    schedules = set()
    for checkpoint in checkpoints:
        job = checkpoint.parent.parent
        assert (job / "config.yaml").is_file()
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        assert state["global_step"] == 2
        schedules.add(
            state["hyper_parameters"]["run_config"]["diffusion"]["betas"]["schedule_name"]
        )
    assert schedules == {"linear", "cosine"}
