"""`DiffusionModule`: the LightningModule that owns the UNet, the process and the t-sampler.

The process (`GaussianDiffusion`) never owns the network; it receives the model on every
call, as in openai/improved-diffusion. This module owns the network, the optimizer and the
timestep sampler; the EMA weights live in the `EMA` callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from diffusion.checkpoint import build_unet, prepare_network
from diffusion.data.loader import global_batch_index
from diffusion.process.gaussian_diffusion import GaussianDiffusion
from diffusion.process.likelihood import estimate_bpd
from diffusion.process.resample import LossAwareSampler, create_named_schedule_sampler
from diffusion.training.metrics import WeightedMean
from diffusion.training.nonfinite import NonFiniteGuard

ANNEALING = ("none", "linear", "cosine")
# The loss-aware t-sampler learns from (t, loss) pairs gathered on the device and handed
# to the host every this many steps (one transfer, not one synchronisation per step).
LOSS_HISTORY_FLUSH_STEPS = 16
SPLIT_MEANS = ("val/bpd", "val/decoder_bpd", "test/bpd", "test/prior_bpd", "test/decoder_bpd")


def check_label_dropout(label_dropout: float, num_classes: int | None) -> None:
    valid = isinstance(label_dropout, (int, float)) and not isinstance(label_dropout, bool)
    if not (valid and 0.0 <= label_dropout < 1.0):
        raise ValueError(f"module.label_dropout={label_dropout!r} must be a number in [0, 1)")
    if label_dropout > 0 and num_classes is None:
        raise ValueError(
            f"module.label_dropout={label_dropout} (classifier-free guidance) needs a "
            "class-conditional run: set class_cond=true with a labelled dataset, or "
            "module.label_dropout=0"
        )


def warmup_anneal_factor(step: int, warmup_steps: int, total_steps: int | None, anneal: str) -> float:
    """Learning-rate multiplier: linear warm-up, then constant, linear or cosine decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if anneal == "none" or not total_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if anneal == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class DiffusionModule(L.LightningModule):
    """Trains a UNet on a Gaussian diffusion process.

    Args:
        model: a callable (a ``functools.partial`` of `diffusion.UNet` from Hydra's
            ``_partial_: true``) that takes ``image_size``, ``in_channels``,
            ``out_channels`` and ``num_classes`` and returns the network.
        diffusion: the process, a `GaussianDiffusion`.
        image_size, in_channels: the data's shape.
        num_classes: number of classes for a class-conditional model, else None.
        label_dropout: p_uncond of classifier-free guidance (Ho & Salimans 2022, arXiv
            2207.12598, Alg. 1): each training label is replaced by the UNet's null label
            with this probability; > 0 builds the UNet with a null class. Needs num_classes.
        schedule_sampler: ``"uniform"`` or ``"loss-second-moment"`` (IDDPM sec. 3.3).
        optimizer: a partial optimizer taking the parameters (AdamW by default).
        warmup_steps: linear learning-rate warm-up.
        anneal: ``"none"``, ``"linear"`` or ``"cosine"`` decay to 0 at the last step.
        val_seed: seeds the t and noise of the validation estimate, so that successive
            validations compare the same terms, and the noise of the test bound; each
            batch's draw depends on its index among all processes' batches, so a split
            sharded across DDP ranks gives the single-process numbers.
        channels_last: run the UNet on NHWC activations (faster convolutions with oneDNN on
            CPUs and with tensor cores on GPUs).
        compile: ``torch.compile`` the UNet in place (``nn.Module.compile``: the state-dict
            keys do not change); the first steps pay for the compilation.
        compile_mode: torch.compile's mode with ``compile``: None (its default),
            ``reduce-overhead`` (CUDA graphs: fewer kernel launches, for a step bound by the
            host), ``max-autotune`` (benchmarks kernel choices; compiles for longer) or
            ``max-autotune-no-cudagraphs``.
        nonfinite: ``{"policy": "skip" | "stop", "max_consecutive": int}`` for steps whose
            loss or gradient is NaN or inf (see `diffusion.training.nonfinite`). Their update
            is skipped on the device (a fused optimizer's ``found_inf``, or the fp16 scaler);
            ``skip`` counts them in ``train/skipped_steps`` and warns, ``stop`` raises.
        run_config: the fully composed run config (a plain dict) stored in the checkpoint, so
            that sample.py and evaluate.py need nothing but the checkpoint.
    """

    def __init__(
        self,
        model: Callable[..., nn.Module],
        diffusion: GaussianDiffusion,
        *,
        image_size: int,
        in_channels: int,
        num_classes: int | None = None,
        label_dropout: float = 0.0,
        schedule_sampler: str = "uniform",
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_steps: int = 0,
        anneal: str = "none",
        val_seed: int = 0,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str | None = None,
        nonfinite: dict[str, Any] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if anneal not in ANNEALING:
            raise ValueError(f"module.anneal={anneal!r} is not one of {ANNEALING}")
        check_label_dropout(label_dropout, num_classes)
        nonfinite = dict(nonfinite or {})  # a plain dict in the checkpoint's hyper-parameters
        self.save_hyperparameters(ignore=["model", "diffusion", "optimizer"])
        self.diffusion = diffusion
        self.model = build_unet(
            model, diffusion, image_size=image_size, in_channels=in_channels,
            num_classes=num_classes, label_dropout=label_dropout,
        )
        prepare_network(self.model, channels_last=channels_last, compile=compile, compile_mode=compile_mode)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.nonfinite = NonFiniteGuard(**nonfinite)
        self.step_applied: torch.Tensor | None = None  # False where the last update was skipped
        self._loss_finite: torch.Tensor | None = None
        self._step_t: torch.Tensor | None = None
        self._pending_losses: list[tuple[torch.Tensor, torch.Tensor]] = []  # (t, loss) on device
        self.image_shape = (in_channels, image_size, image_size)
        self.num_classes = num_classes
        self.schedule_sampler = create_named_schedule_sampler(schedule_sampler, diffusion)
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        # Loss per quarter of the t range, accumulated on-device (no per-step sync).
        self.quarter_loss = nn.ModuleList(WeightedMean() for _ in range(4))
        # Means over a whole validation or test split (see log_split_mean).
        self.split_means = nn.ModuleDict({name.replace("/", "_"): WeightedMean() for name in SPLIT_MEANS})

    # ----------------------------------------------------------------------------- model
    def model_kwargs(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": labels} if self.num_classes is not None else {}

    @staticmethod
    def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(x_start, labels, other model kwargs). A super-resolution dataset's batches carry a
        dict of model kwargs (``low_res``, the labels as ``y``) in place of the labels
        (`diffusion.data.superres`)."""
        x_start, extra = batch
        if not isinstance(extra, dict):
            return x_start, extra, {}
        conditions = {key: value for key, value in extra.items() if key != "y"}
        return x_start, extra["y"], conditions

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null label with probability ``label_dropout`` (Ho &
        Salimans 2022, Alg. 1), drawn on the labels' device without a host sync."""
        if not self.hparams.label_dropout:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.hparams.label_dropout
        return labels.masked_fill(drop, self.model.null_label)

    def denoiser(self, x_t: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """The network as the process calls it. Under autocast the UNet may run in half
        precision; its output is cast back so the diffusion math and the loss stay float32."""
        return self.model(x_t.contiguous(memory_format=self.memory_format), t, **model_kwargs).float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        return self.denoiser(x_t, t, **model_kwargs)

    # -------------------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x_start, labels, conditions = self.split_batch(batch)
        t, weights = self.schedule_sampler.sample(x_start.shape[0], x_start.device)
        model_kwargs = {**self.model_kwargs(self.drop_labels(labels)), **conditions}
        terms = self.diffusion.training_losses(self.denoiser, x_start.float(), t, model_kwargs=model_kwargs)
        if isinstance(self.schedule_sampler, LossAwareSampler):
            self._pending_losses.append((t, terms["loss"].detach()))
            if len(self._pending_losses) >= LOSS_HISTORY_FLUSH_STEPS:
                self.flush_loss_history()
        loss = (terms["loss"] * weights).mean()
        # Read in configure_gradient_clipping, after the backward, without a host sync.
        self._loss_finite, self._step_t = torch.isfinite(loss.detach()), t
        self.log_terms(terms, t, batch_size=x_start.shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=x_start.shape[0])
        return loss

    def flush_loss_history(self) -> None:
        """Hand the gathered (t, loss) pairs to the loss-aware sampler: one transfer (and,
        under DDP, one all_gather) for many steps. Non-finite losses are dropped there."""
        if not self._pending_losses:
            return
        device = self._pending_losses[-1][0].device  # entries restored from a checkpoint are on the CPU
        ts, losses = (torch.cat([p.to(device) for p in parts]) for parts in zip(*self._pending_losses, strict=True))
        self._pending_losses = []
        # Gathers (t, loss) from every DDP rank before updating the history.
        self.schedule_sampler.update_with_local_losses(ts, losses)

    def log_terms(self, terms: dict[str, torch.Tensor], t: torch.Tensor, batch_size: int) -> None:
        for key in ("mse", "vb"):
            if key in terms:
                self.log(f"train/{key}", terms[key].mean(), batch_size=batch_size)
        quarter = (4 * t) // self.diffusion.num_timesteps  # (B,) in {0, 1, 2, 3}
        loss = terms["loss"].detach()
        finite = torch.isfinite(loss)  # skipped steps stay out of the averages
        loss = torch.where(finite, loss, torch.zeros_like(loss))
        for q, metric in enumerate(self.quarter_loss):
            mask = ((quarter == q) & finite).to(loss.dtype)
            metric.update(loss, mask)
            self.log(f"train/loss_q{q}", metric, on_step=False, on_epoch=True)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip, then decide on the device whether this step's update is applied.

        The gradient norm is computed (and logged) at every step; a non-finite loss or norm
        skips the update. A fused optimizer skips it through ``found_inf``, the fp16 scaler
        by itself; any other optimizer costs one host read per step to drop the gradients.
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # a fused optimizer would unscale inside step(): too late for the norm
        grads = [p.grad for p in params]
        if gradient_clip_val and gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
        if gradient_clip_val and gradient_clip_algorithm != "value":
            norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        self.log("train/grad_norm", norm)
        loss_ok = self._loss_finite if self._loss_finite is not None else torch.isfinite(norm)
        ok = loss_ok & torch.isfinite(norm)
        if scaler is None and optimizer.defaults.get("fused"):
            optimizer.found_inf = (~ok).float()
        elif scaler is None and not bool(ok):  # unfused: one sync per step; None grads are skipped
            optimizer.zero_grad(set_to_none=True)
        self.step_applied = ok
        # Under the fp16 scaler an overflowing gradient is routine (the scale drops); only a
        # non-finite loss counts as a fault.
        self.nonfinite.record(loss_ok if scaler is not None else ok, self._step_t, self.global_step)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.model.parameters())
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        hp = self.hparams
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_anneal_factor(step, hp.warmup_steps, total, hp.anneal)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Act on non-finite steps reported by the device (a step or two late on CUDA)."""
        message = self.nonfinite.check(self.nonfinite.poll(), self.last_checkpoint())
        if message:
            rank_zero_warn(message)
        self.log("train/skipped_steps", self.nonfinite.count.float())
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and self.global_step % self.trainer.log_every_n_steps == 0:
            # get_scale() reads the device: once per logging interval, not per step.
            self.log("train/loss_scale", scaler.get_scale())

    def last_checkpoint(self) -> str | None:
        callback = self.trainer.checkpoint_callback
        return (callback.last_model_path or callback.best_model_path or None) if callback else None

    # ------------------------------------------------------------------------ validation
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """An unbiased estimate of the bound in bits/dim with two network calls per image
        (exact prior and decoder terms, stratified importance sampling of the others; see
        `diffusion.process.likelihood`), with the same t and noise at every validation."""
        x_start, labels, conditions = self.split_batch(batch)
        terms = estimate_bpd(
            self.diffusion, self.denoiser, x_start.float(), clip_denoised=True,
            model_kwargs={**self.model_kwargs(labels), **conditions}, generator=self.batch_generator(batch_idx),
        )
        self.log_split_mean("val/bpd", terms["total_bpd"], prog_bar=True)
        self.log_split_mean("val/decoder_bpd", terms["decoder_bpd"])

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """The full bound: every term of DDPM eq. 5 (calc_bpd_loop), in bits/dim. The columns
        of ``vb`` run from t = T-1 down to t = 0, the decoder term (improved-diffusion order)."""
        x_start, labels, conditions = self.split_batch(batch)
        out = self.diffusion.calc_bpd_loop(
            self.denoiser, x_start.float(), clip_denoised=True,
            model_kwargs={**self.model_kwargs(labels), **conditions},
            generator=self.batch_generator(batch_idx),
        )
        self.log_split_mean("test/bpd", out["total_bpd"])
        self.log_split_mean("test/prior_bpd", out["prior_bpd"])
        self.log_split_mean("test/decoder_bpd", out["vb"][:, -1])

    def batch_generator(self, batch_idx: int) -> torch.Generator:
        """A CPU generator (the same noise on any device) seeded by the batch's index among
        all processes' evaluation batches, as a single process would number it."""
        return torch.Generator().manual_seed(self.hparams.val_seed + global_batch_index(batch_idx))

    def log_split_mean(self, name: str, values: torch.Tensor, **kwargs: Any) -> None:
        """Log the mean of per-image ``values`` over the whole split: Σ and count summed
        across DDP ranks, each image once (a rank's share may be smaller than another's),
        in float64, so the number equals the single-process one."""
        metric = self.split_means[name.replace("/", "_")]
        metric.update(values, torch.ones_like(values))
        self.log(name, metric, on_step=False, on_epoch=True, **kwargs)

    # ---------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if hasattr(self.schedule_sampler, "state_dict"):
            checkpoint["schedule_sampler"] = self.schedule_sampler.state_dict()
        # Not yet handed to the sampler: kept so that a resume flushes at the same steps.
        checkpoint["pending_losses"] = [(t.cpu(), loss.cpu()) for t, loss in self._pending_losses]
        checkpoint["nonfinite"] = self.nonfinite.state_dict()
        # The running sums of the epoch-level train/loss_q* means: the epoch that spans a
        # resume then reports the means of all its steps, as an uninterrupted run does.
        checkpoint["quarter_loss"] = self.quarter_loss_sums()

    def quarter_loss_sums(self) -> torch.Tensor:
        """(4, 2) float64 on the CPU: Σ w·loss and Σ w of each quarter so far this epoch,
        summed over the processes (a collective under DDP, where every rank saves)."""
        sums = torch.stack([torch.stack([m.weighted_sum, m.weight]) for m in self.quarter_loss])
        if self._trainer is not None and self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        return sums.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("schedule_sampler")
        if state is not None and hasattr(self.schedule_sampler, "load_state_dict"):
            self.schedule_sampler.load_state_dict(state)
        self._pending_losses = [(t, loss) for t, loss in checkpoint.get("pending_losses", [])]
        if "nonfinite" in checkpoint:
            self.nonfinite.load_state_dict(checkpoint["nonfinite"])
        sums = checkpoint.get("quarter_loss")
        if sums is not None:  # all on one process: the means sum the processes' parts
            first = self._trainer is None or self.trainer.global_rank == 0
            for metric, (weighted_sum, weight) in zip(self.quarter_loss, sums, strict=True):
                metric.weighted_sum.copy_(weighted_sum if first else 0.0)
                metric.weight.copy_(weight if first else 0.0)
