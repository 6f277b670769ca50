"""`SampleGrid`: a fixed-noise grid of DDIM samples during training; `ProgressBar`;
`MetricsPlot`: the run's loss and metrics as one PNG when fit and test end.

Watching samples from the same starting noise x_T at every checkpoint shows how the model
(with its EMA weights) converges far better than the loss does. DDIM with η = 0 (DDIM
eq. 12, arXiv 2010.02502) maps x_T to x_0 deterministically, so with fixed noise two grids
differ only because the weights did. The grid is drawn by the sampler object that
``sample.py sampler=ddimN`` uses (`diffusion.sampling.DDIMSampler`, N = ``ddim_steps``), so
it visits the same steps and shows what sample.py would draw from the same noise.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from diffusion.plot import DEFAULT_FILENAME, plot_metrics, run_title
from diffusion.sampling import DDIMSampler
from diffusion.training.ema import EMA
from diffusion.utils.checks import require_int
from diffusion.utils.images import save_grid, save_image_grid, to_uint8

LOG_KEY = "train/samples"
log = logging.getLogger(__name__)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside, and afterwards every sub-module's own previous mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# --------------------------------------------------------------------------- callback
class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and once at the end of fit) draw
    ``num_samples`` images from fixed noise with DDIM (η = 0, ``ddim_steps`` steps, the
    sampler of ``sample.py sampler=ddim<ddim_steps>``) and the EMA weights of the first rate (the raw weights without an `EMA`
    callback), save them as ``<log_dir>/samples/step_XXXXXXX.png`` and ``samples/last.png``,
    and send the grid to the loggers that take images (wandb's ``log_image``,
    TensorBoard's ``add_image``). Only global rank 0 draws.

    Expects the LightningModule to have ``model`` (called as ``model(x_t, t, **kwargs)``),
    ``diffusion`` (a full-length `GaussianDiffusion`), ``image_shape`` (C, H, W) and
    ``num_classes`` (None, or labels 0..num_classes-1 are cycled over the grid).

    Args:
        every_n_steps: optimizer steps between grids; 0 draws only at the end.
        num_samples: images per grid; a square number gives a square grid.
        ddim_steps: DDIM steps N, visited as ``DDIMSampler(steps=N)`` visits them
            (``range(0, T, k)`` with exactly N entries).
        seed: seeds the fixed noise x_T (drawn on the CPU, so it is the same on any device).
        clip_denoised: clip the predicted x_0 to [-1, 1] at each step.
        on_fit_end: also draw when training ends (unless that step was just drawn).
        dirpath: the folder of the PNG files; default ``<trainer.log_dir>/samples``.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 64,
        ddim_steps: int = 20,
        seed: int = 0,
        clip_denoised: bool = True,
        on_fit_end: bool = True,
        dirpath: str | None = None,
    ) -> None:
        super().__init__()
        self.dirpath = dirpath
        for name, value, low in (("every_n_steps", every_n_steps, 0), ("num_samples", num_samples, 1),
                                 ("ddim_steps", ddim_steps, 1)):
            require_int(name, value, low)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.ddim_steps = ddim_steps
        self.seed = seed
        self.clip_denoised = clip_denoised
        # Not `self.on_fit_end`: that name is the Callback hook, which this would shadow.
        self.draw_at_end = on_fit_end
        self.last_grid: torch.Tensor | None = None  # the last grid drawn, (3, H', W') in [0, 1]
        self._last_step = -1
        self._folder: str | None = None
        self._noise_cpu: torch.Tensor | None = None
        self._noise: torch.Tensor | None = None
        self.sampler = DDIMSampler(steps=ddim_steps, eta=0.0)

    # ------------------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check(pl_module.diffusion)  # at set-up, not after hours of training
        # trainer.log_dir is a collective (it broadcasts from rank 0): every rank asks here.
        self._folder = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "samples")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The end of fit, while the module is still on its device (the strategy's teardown,
        # which runs before the on_fit_end hook, moves it to the CPU).
        # Not after a fast_dev_run: a smoke test of the loop, not a run worth a grid.
        if self.draw_at_end and trainer.global_step != self._last_step and not trainer.fast_dev_run:
            self.draw(trainer, pl_module)

    # ----------------------------------------------------------------------- drawing
    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        """Draw, save and log one grid for the current step; returns its path on rank 0."""
        step = trainer.global_step
        self._last_step = step
        if not trainer.is_global_zero:
            return None
        images = self.sample(pl_module, EMA.find(trainer))
        folder = self._folder or os.path.join(trainer.default_root_dir, "samples")
        path = os.path.join(folder, f"step_{step:07d}.png")
        self.last_grid = save_image_grid(images, path)
        save_grid(self.last_grid, os.path.join(folder, "last.png"))
        self._log(trainer, self.last_grid, step)
        return path

    def sample(self, pl_module: L.LightningModule, ema: EMA | None = None) -> torch.Tensor:
        """The grid's images, (num_samples, C, H, W) in [-1, 1], with ``ema``'s first rate
        swapped in (raw weights when None), in eval mode and without gradients."""
        self.check(pl_module.diffusion)
        device = pl_module.device
        noise = self.fixed_noise(tuple(pl_module.image_shape), device)
        model_kwargs = {}
        if getattr(pl_module, "num_classes", None) is not None:
            model_kwargs["y"] = torch.arange(self.num_samples, device=device) % pl_module.num_classes
        weights = ema.swapped(pl_module) if ema is not None else contextlib.nullcontext()
        with weights, _eval_mode(pl_module), torch.no_grad():
            network = pl_module.model

            def model(x_t: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return network(x_t, t, **kwargs).to(x_t.dtype)  # e.g. a bf16 UNet

            return self.sampler(pl_module.diffusion, model, noise=noise, clip_denoised=self.clip_denoised,
                                model_kwargs=model_kwargs)

    def check(self, diffusion: Any) -> None:
        """Raise a ValueError naming ``ddim_steps`` if DDIM cannot take them on ``diffusion``."""
        try:
            self.sampler.check(diffusion)
        except ValueError as err:
            num_timesteps = diffusion.num_timesteps
            raise ValueError(
                f"ddim_steps={self.ddim_steps} does not fit the process's T={num_timesteps} "
                f"steps ({err}); choose a count in 1..{num_timesteps} that DDIM's uniform skip can take"
            ) from None

    def fixed_noise(self, image_shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        """x_T for the grid: drawn once on the CPU from ``seed``, cached per device."""
        shape = (self.num_samples, *image_shape)
        if self._noise_cpu is None or tuple(self._noise_cpu.shape) != shape:
            generator = torch.Generator().manual_seed(self.seed)
            self._noise_cpu = torch.randn(shape, generator=generator)
            self._noise = None
        if self._noise is None or self._noise.device != torch.device(device):
            self._noise = self._noise_cpu.to(device)
        return self._noise

    @staticmethod
    def _log(trainer: L.Trainer, grid: torch.Tensor, step: int) -> None:
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger (and others with the same API)
                hwc = to_uint8(grid * 2 - 1).permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)
                logger.log_image(key=LOG_KEY, images=[hwc], step=step)
                continue
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
                experiment.add_image(LOG_KEY, grid, global_step=step)


class ProgressBar(RichProgressBar):
    """Rich's progress bar, reading the logged metrics every ``metrics_every_n_steps`` steps,
    and counting optimizer steps against ``max_steps`` on a run bounded by steps.

    Reading the metrics turns each into a Python number, which makes the host wait for the
    device; Rich's bar would do that after every training batch. In between it shows the
    last values. Rich's bar counts the batches of the epoch against ``max_epochs - 1``,
    which reads ``Epoch 218/-2`` on a run bounded by steps (``max_epochs=-1``).
    """

    def __init__(self, metrics_every_n_steps: int = 25, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        require_int("metrics_every_n_steps", metrics_every_n_steps, 1)
        self.metrics_every_n_steps = metrics_every_n_steps
        self._shown: dict[str, Any] | None = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if trainer.training and self._shown is not None and trainer.global_step % self.metrics_every_n_steps:
            return self._shown
        self._shown = super().get_metrics(trainer, pl_module)
        return self._shown

    @staticmethod
    def _bounded_by_steps(trainer: L.Trainer) -> bool:
        return trainer.max_epochs in (None, -1) and bool(trainer.max_steps) and trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        if self._bounded_by_steps(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if self._bounded_by_steps(self.trainer):
            return f"Epoch {current_epoch}, step"
        return super()._get_train_description(current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """On a run bounded by steps, one bar for the whole run: a new epoch renames it but
        keeps its count and its rate (Rich's reset to 0 would read as a jump of a whole
        epoch's steps in no time, millions of it/s)."""
        steps, task = self._bounded_by_steps(trainer), self.train_progress_bar_id
        if steps and task is not None and self.progress is not None:
            self.progress.update(task, description=self._get_train_description(trainer.current_epoch))
            self.refresh()
            return
        super().on_train_epoch_start(trainer, pl_module)
        if steps and self.train_progress_bar_id is not None and self.progress is not None:
            # The first epoch of a resumed run starts at its step, without counting a jump.
            self.progress.reset(self.train_progress_bar_id, total=trainer.max_steps, completed=trainer.global_step,
                                description=self._get_train_description(trainer.current_epoch))

    def _update(self, progress_bar_id: Any, current: int, visible: bool = True, hard: bool = False) -> None:
        # Rich's bar sets the training bar to the epoch's batch count after each batch; on a
        # run bounded by steps it shows the run's steps instead (one update, one refresh).
        if progress_bar_id is not None and progress_bar_id == self.train_progress_bar_id \
                and self._bounded_by_steps(self.trainer):
            current = self.trainer.global_step
        super()._update(progress_bar_id, current, visible, hard)


class MetricsPlot(L.Callback):
    """When fit ends, and again when test ends (adding test/bpd), draw the run's CSV log as
    one PNG (`diffusion.plot.plot_metrics`, what ``python -m diffusion.plot RUN_DIR`` draws):
    training loss, loss per quarter of t, bits/dim, learning rate. Also when a run stops
    on an error or a signal, with what was logged until then.

    Only global rank 0 draws, and only with a CSV logger (``logger=csv``, the default). A
    plot that cannot be drawn (a full disk, a log with nothing to plot) is a warning in the
    log, never a failed run. Not after a fast_dev_run, which logs nothing.

    Args:
        path: the PNG; default ``<trainer.default_root_dir>/metrics.png``.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self.path = path
        self.drawn: tuple[str, ...] = ()  # the panels of the last plot written

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After the stage's last logging; the loggers' own final save comes after this hook.
        if stage in ("fit", "test"):
            self.draw(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.draw(trainer)

    def draw(self, trainer: L.Trainer) -> str | None:
        """Flush the CSV logger and draw its file; returns the PNG's path, or None (not rank
        0, no CSV logger, nothing logged yet, a fast_dev_run, or a failure, which is logged
        as a warning)."""
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if not trainer.is_global_zero or csv_logger is None or trainer.fast_dev_run:
            return None
        if csv_logger._experiment is None:  # a stop before fit began: asking would create csv/
            return None
        path = self.path or os.path.join(trainer.default_root_dir, DEFAULT_FILENAME)
        try:
            csv_logger.save()  # rows still buffered in the logger
            csv_path = csv_logger.experiment.metrics_file_path
            if not os.path.isfile(csv_path):  # no metric logged yet: nothing to draw
                return None
            drawn = plot_metrics(csv_path, path, title=run_title(trainer.default_root_dir))
        except Exception as err:  # a plot is a report: it never fails the run
            log.warning("metrics plot %s not drawn: %s", path, " ".join(str(err).split()))
            return None
        self.drawn = drawn.panels
        return drawn.path
