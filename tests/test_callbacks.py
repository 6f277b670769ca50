"""SampleGrid callback and the atomic `save_image_grid` helper."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, Logger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from diffusion.process.gaussian_diffusion import GaussianDiffusion
from diffusion.process.respace import SpacedDiffusion
from diffusion.process.schedules import get_named_beta_schedule
from diffusion.sampling import get_sampler
from diffusion.training import callbacks
from diffusion.training.callbacks import SampleGrid
from diffusion.training.ema import EMA
from diffusion.utils import images as images_module
from diffusion.utils.images import make_image_grid, save_image_grid

from conftest import quiet_trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),
]

SHAPE = (1, 6, 6)  # (C, H, W)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class TinyDenoiser(nn.Module):
    """A 3x3 convolution whose output also depends on t and (optionally) the label y."""

    def __init__(self, channels: int, num_classes: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.label = nn.Embedding(num_classes, channels) if num_classes else None
        self.seen_labels: list[torch.Tensor] = []

    def forward(self, x, t, y=None):
        out = self.conv(x) * (1 + t.float().view(-1, 1, 1, 1) / 20)
        if y is not None:
            self.seen_labels.append(y.clone())
            out = out + self.label(y)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        return out


class TinyDiffusionModule(L.LightningModule):
    def __init__(self, num_classes: int | None = None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = TinyDenoiser(SHAPE[0], num_classes)
        self.diffusion = GaussianDiffusion(
            betas=get_named_beta_schedule("cosine", 20),
            model_mean_type="epsilon",
            model_var_type="fixed_large",
            loss_type="mse",
        )
        self.image_shape = SHAPE
        self.num_classes = num_classes

    def training_step(self, batch, batch_idx):
        (x,) = batch
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],))
        noise = torch.randn_like(x)
        return F.mse_loss(self.model(self.diffusion.q_sample(x, t, noise=noise), t), noise)

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.5)


def _loader() -> DataLoader:
    x = torch.rand(8, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return DataLoader(TensorDataset(x), batch_size=4)


def _fit(tmp_path, callbacks_, max_steps=4, logger=False, module=None):
    module = module or TinyDiffusionModule()
    trainer = quiet_trainer(tmp_path, callbacks_, max_steps, logger=logger)
    torch.manual_seed(1)  # the t and noise of the training steps
    trainer.fit(module, _loader())
    return trainer, module


def _read_png(path) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _grid_side(n_per_row: int, size: int) -> int:
    return n_per_row * (size + 2) + 2  # make_grid's padding of 2 around every image


# ------------------------------------------------------------------------ the callback
def test_grid_files_appear_with_the_right_size_and_no_temp_files(tmp_path):
    grid_cb = SampleGrid(every_n_steps=2, num_samples=9, ddim_steps=5)
    trainer, module = _fit(tmp_path, [grid_cb], max_steps=4)
    folder = tmp_path / "samples"
    # steps 2 and 4; the end of fit is step 4 again, so no third grid
    assert sorted(os.listdir(folder)) == ["last.png", "step_0000002.png", "step_0000004.png"]
    side = _grid_side(3, SHAPE[1])
    for name in os.listdir(folder):
        assert _read_png(folder / name).shape == (side, side, 3)
    assert (folder / "last.png").read_bytes() == (folder / "step_0000004.png").read_bytes()
    assert module.training and module.model.training  # train mode restored


def test_end_of_fit_grid_and_log_dir_of_the_logger(tmp_path):
    grid_cb = SampleGrid(every_n_steps=0, num_samples=4, ddim_steps=3)
    trainer, _ = _fit(tmp_path, [grid_cb], max_steps=3, logger=CSVLogger(tmp_path, name="run"))
    folder = os.path.join(trainer.log_dir, "samples")
    assert folder.startswith(str(tmp_path / "run"))
    assert sorted(os.listdir(folder)) == ["last.png", "step_0000003.png"]
    assert _read_png(os.path.join(folder, "last.png")).shape == (
        _grid_side(2, 6),
        _grid_side(2, 6),
        3,
    )


def test_same_seed_gives_identical_grids_and_another_seed_does_not(tmp_path):
    pixels = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        _fit(
            tmp_path / run,
            [SampleGrid(every_n_steps=0, num_samples=4, ddim_steps=4, seed=seed)],
            max_steps=2,
        )
        pixels.append(_read_png(tmp_path / run / "samples" / "last.png"))
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])
    module = TinyDiffusionModule()
    first = SampleGrid(num_samples=4, ddim_steps=4, seed=3).sample(module)
    again = SampleGrid(num_samples=4, ddim_steps=4, seed=3).sample(module)
    assert torch.equal(first, again) and first.shape == (4, *SHAPE)


def test_grid_uses_the_ema_weights_and_restores_the_raw_ones(tmp_path):
    ema = EMA(decays=(0.5,))
    grid_cb = SampleGrid(every_n_steps=0, num_samples=4, ddim_steps=4)
    trainer, module = _fit(tmp_path, [ema, grid_cb], max_steps=4)
    raw_grid = make_image_grid(grid_cb.sample(module))  # no EMA passed: raw weights
    # Independently: DDIM on the averaged network itself, from the same fixed noise.
    spaced = SpacedDiffusion(
        range(0, 20, 5),  # DDIM's uniform skip: 4 steps of T = 20, as sampler=ddim4 takes them
        betas=module.diffusion.betas,
        model_mean_type="epsilon",
        model_var_type="fixed_large",
        loss_type="mse",
    )
    averaged = ema.averaged_models[0.5].module.eval()
    noise = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(0))
    expected = spaced.ddim_sample_loop(averaged, (4, *SHAPE), noise=noise, eta=0.0)
    torch.testing.assert_close(grid_cb.last_grid, make_image_grid(expected), rtol=0, atol=1e-6)
    assert not torch.allclose(
        grid_cb.last_grid, raw_grid, atol=1e-3
    )  # the test can tell them apart
    assert not torch.equal(module.model.conv.weight, averaged.conv.weight)  # raw weights are back


def test_grid_visits_the_steps_of_sample_py_ddim_sampler():
    """The grid of ddim_steps=20 on T = 1000 is sample.py's sampler=ddim20: t = 950, 900, ..., 0
    (not 20 evenly spaced reals rounded, 999, 946, ..., 0), and the same images from the same x_T."""
    module = TinyDiffusionModule()
    module.diffusion = GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000),
                                         model_mean_type="epsilon", model_var_type="fixed_large",
                                         loss_type="mse")
    seen = []
    hook = module.model.register_forward_pre_hook(lambda net, args: seen.append(args[1][0].item()))
    grid_cb = SampleGrid(num_samples=2, ddim_steps=20, seed=5)
    images = grid_cb.sample(module)
    hook.remove()
    assert seen == list(range(950, -1, -50))
    noise = grid_cb.fixed_noise(SHAPE, "cpu")
    expected = get_sampler("ddim20")(module.diffusion, module.model.eval(), noise=noise)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)


def test_class_conditional_labels_cycle_over_the_classes():
    module = TinyDiffusionModule(num_classes=3)
    SampleGrid(num_samples=7, ddim_steps=2).sample(module)
    assert len(module.model.seen_labels) == 2  # one network call per DDIM step
    for labels in module.model.seen_labels:
        assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]


class _QuietLogger(Logger):
    name, version = "fake", 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class WandbLike(_QuietLogger):
    def __init__(self):
        super().__init__()
        self.images = []

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, images, step))


class TensorBoardLike(_QuietLogger):
    """No log_image: the grid goes to ``experiment.add_image`` (a SummaryWriter's API)."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self._writer = SimpleNamespace(add_image=lambda *a, **k: self.calls.append((a, k)))

    @property
    def experiment(self):
        return self._writer


def test_images_go_to_loggers_that_take_them(tmp_path):
    wandb_like, board_like = WandbLike(), TensorBoardLike()
    _fit(
        tmp_path,
        [SampleGrid(every_n_steps=2, num_samples=4, ddim_steps=2)],
        max_steps=2,
        logger=[wandb_like, board_like],
    )
    side = _grid_side(2, 6)
    ((key, images, step),) = wandb_like.images
    assert key == "train/samples" and step == 2
    assert images[0].dtype == np.uint8 and images[0].shape == (side, side, 3)
    ((args, kwargs),) = board_like.calls
    assert (
        args[0] == "train/samples"
        and kwargs["global_step"] == 2
        and tuple(args[1].shape) == (3, side, side)
    )
    np.testing.assert_array_equal(
        images[0], (args[1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    )


def test_only_global_rank_zero_draws(tmp_path):
    grid_cb = SampleGrid(num_samples=4, ddim_steps=2)
    trainer = SimpleNamespace(
        global_step=5, is_global_zero=False, default_root_dir=str(tmp_path), callbacks=[]
    )
    assert grid_cb.draw(trainer, TinyDiffusionModule()) is None
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": -1}, "every_n_steps=-1"),
        ({"num_samples": 0}, "num_samples=0"),
        ({"ddim_steps": 0}, "ddim_steps=0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleGrid(**kwargs)


def test_more_ddim_steps_than_the_process_has_is_an_error():
    with pytest.raises(ValueError, match=r"ddim_steps=21 does not fit.*T=20.*1\.\.20"):
        SampleGrid(num_samples=1, ddim_steps=21).sample(TinyDiffusionModule())


def test_the_hook_is_not_shadowed_by_the_flag():
    grid_cb = SampleGrid(on_fit_end=False)
    assert callable(grid_cb.on_fit_end) and grid_cb.draw_at_end is False


# ------------------------------------------------------------------------- the helper
def test_save_image_grid_layout_and_value_range(tmp_path):
    images = torch.full((6, 3, 4, 4), -1.0)
    images[1] = 1.0  # the second image is white, the rest black
    grid = save_image_grid(images, tmp_path / "g.png")  # default nrow = ceil(sqrt(6)) = 3
    pixels = _read_png(tmp_path / "g.png")
    assert pixels.shape == (2 * 6 + 2, 3 * 6 + 2, 3) and tuple(grid.shape) == (3, 14, 20)
    assert (pixels[2:6, 8:12] == 255).all() and (pixels[2:6, 2:6] == 0).all()
    save_image_grid(images, tmp_path / "g2.png", nrow=6)
    assert _read_png(tmp_path / "g2.png").shape == (6 + 2, 6 * 6 + 2, 3)
    assert sorted(os.listdir(tmp_path)) == ["g.png", "g2.png"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "grid.png"
    save_image_grid(torch.zeros(4, 1, 4, 4), target)
    before = target.read_bytes()

    def broken_save(tensor, fp, format=None):
        fp.write(b"half a PNG")  # the open temporary file
        raise OSError("disk full")

    monkeypatch.setattr(images_module, "save_image", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_image_grid(torch.ones(4, 1, 4, 4), target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["grid.png"]


def test_save_image_grid_rejects_unknown_extensions(tmp_path):
    with pytest.raises(ValueError, match=r"grid\.xyz.*\.png"):
        save_image_grid(torch.zeros(1, 3, 4, 4), tmp_path / "grid.xyz")


class _Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_progress_bar_reads_the_metrics_every_n_steps_only(tmp_path, monkeypatch):
    reads = []
    real = L.pytorch.callbacks.RichProgressBar.get_metrics
    monkeypatch.setattr(L.pytorch.callbacks.RichProgressBar, "get_metrics",
                        lambda self, trainer, module: reads.append(trainer.global_step) or real(self, trainer, module))
    bar = callbacks.ProgressBar(metrics_every_n_steps=5)
    data = DataLoader(TensorDataset(torch.randn(40, 2), torch.randn(40, 1)), batch_size=2)
    trainer = quiet_trainer(tmp_path, [bar], max_steps=20, enable_progress_bar=True)
    trainer.fit(_Regression(), train_dataloaders=data)
    # the first batch (nothing shown yet), then every 5th: 4 reads where Rich makes 20
    assert [step for step in reads if step > 0][:5] == [1, 5, 10, 15, 20]
    assert len([step for step in reads if step > 0]) <= 6  # at most one more, at the end of fit
    assert "train/loss" in bar.get_metrics(trainer, None)
    with pytest.raises(ValueError, match="metrics_every_n_steps=0"):
        callbacks.ProgressBar(metrics_every_n_steps=0)


def test_progress_bar_counts_steps_on_a_run_bounded_by_steps(tmp_path):
    """Rich's bar read 'Epoch 2/-2' with max_epochs=-1; ours counts steps against max_steps,
    on one bar whose rate a new epoch does not corrupt."""
    shown, speeds = [], []

    class Recording(callbacks.ProgressBar):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            task = self.progress.tasks[self.train_progress_bar_id]
            shown.append((task.description, task.completed, task.total))
            speeds.append(task.speed)

    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=2)  # 4 per epoch
    trainer = quiet_trainer(tmp_path, [Recording()], max_steps=10, max_epochs=-1, enable_progress_bar=True)
    started = time.perf_counter()
    trainer.fit(_Regression(), train_dataloaders=data)
    assert [completed for _, completed, _ in shown] == list(range(1, 11))
    assert {total for _, _, total in shown} == {10}
    assert all("-2" not in description for description, _, _ in shown), shown
    assert shown[-1][0].startswith("Epoch 2")
    elapsed = time.perf_counter() - started
    assert max(speed or 0 for speed in speeds) < 100 * 10 / elapsed  # not an epoch's steps in no time
