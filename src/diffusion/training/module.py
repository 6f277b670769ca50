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
from torch import nn
from torchmetrics import MeanMetric

from diffusion.process.gaussian_diffusion import GaussianDiffusion, ModelVarType
from diffusion.process.likelihood import estimate_bpd
from diffusion.process.resample import LossAwareSampler, create_named_schedule_sampler

LEARNED_VARIANCES = (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
ANNEALING = ("none", "linear", "cosine")


def build_unet(
    model: Callable[..., nn.Module],
    diffusion: GaussianDiffusion,
    *,
    image_size: int,
    in_channels: int,
    num_classes: int | None,
    label_dropout: float = 0.0,
) -> nn.Module:
    """Finish the partially configured UNet with what the data and the process decide.

    The output width follows the variance type (2C for learned variances, mean part
    first), and the null class of classifier-free guidance follows ``label_dropout > 0``,
    so that no two config keys can disagree about either.
    """
    out_channels = in_channels * (2 if diffusion.model_var_type in LEARNED_VARIANCES else 1)
    return model(
        image_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        num_classes=num_classes,
        null_class=label_dropout > 0,
    )


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
            validations compare the same terms.
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
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if anneal not in ANNEALING:
            raise ValueError(f"anneal={anneal!r} is not one of {ANNEALING}")
        check_label_dropout(label_dropout, num_classes)
        self.save_hyperparameters(ignore=["model", "diffusion", "optimizer"])
        self.diffusion = diffusion
        self.model = build_unet(
            model, diffusion, image_size=image_size, in_channels=in_channels,
            num_classes=num_classes, label_dropout=label_dropout,
        )
        self.image_shape = (in_channels, image_size, image_size)
        self.num_classes = num_classes
        self.schedule_sampler = create_named_schedule_sampler(schedule_sampler, diffusion)
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        # Loss per quarter of the t range, accumulated on-device (no per-step sync).
        self.quarter_loss = nn.ModuleList(MeanMetric() for _ in range(4))

    # ----------------------------------------------------------------------------- model
    def model_kwargs(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": labels} if self.num_classes is not None else {}

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
        return self.model(x_t, t, **model_kwargs).float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        return self.denoiser(x_t, t, **model_kwargs)

    # -------------------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x_start, labels = batch
        t, weights = self.schedule_sampler.sample(x_start.shape[0], x_start.device)
        model_kwargs = self.model_kwargs(self.drop_labels(labels))
        terms = self.diffusion.training_losses(self.denoiser, x_start.float(), t, model_kwargs=model_kwargs)
        if isinstance(self.schedule_sampler, LossAwareSampler):
            # Gathers (t, loss) from every DDP rank before updating the history.
            self.schedule_sampler.update_with_local_losses(t, terms["loss"].detach())
        loss = (terms["loss"] * weights).mean()
        self.log_terms(terms, t, batch_size=x_start.shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=x_start.shape[0])
        return loss

    def log_terms(self, terms: dict[str, torch.Tensor], t: torch.Tensor, batch_size: int) -> None:
        for key in ("mse", "vb"):
            if key in terms:
                self.log(f"train/{key}", terms[key].mean(), batch_size=batch_size)
        quarter = (4 * t) // self.diffusion.num_timesteps  # (B,) in {0, 1, 2, 3}
        for q, metric in enumerate(self.quarter_loss):
            mask = (quarter == q).to(terms["loss"].dtype)
            metric.update(terms["loss"].detach(), mask)
            self.log(f"train/loss_q{q}", metric, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.model.parameters())
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        hp = self.hparams
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_anneal_factor(step, hp.warmup_steps, total, hp.anneal)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------------ validation
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """An unbiased estimate of the bound in bits/dim with two network calls per image
        (exact prior and decoder terms, stratified importance sampling of the others; see
        `diffusion.process.likelihood`), with the same t and noise at every validation."""
        x_start, labels = batch
        generator = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        terms = estimate_bpd(
            self.diffusion, self.denoiser, x_start.float(), clip_denoised=True,
            model_kwargs=self.model_kwargs(labels), generator=generator,
        )
        batch_size = x_start.shape[0]
        self.log("val/bpd", terms["total_bpd"].mean(), prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log("val/decoder_bpd", terms["decoder_bpd"].mean(), batch_size=batch_size, sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """The full bound: every term of DDPM eq. 5 (calc_bpd_loop), in bits/dim. The columns
        of ``vb`` run from t = T-1 down to t = 0, the decoder term (improved-diffusion order)."""
        x_start, labels = batch
        out = self.diffusion.calc_bpd_loop(
            self.denoiser, x_start.float(), clip_denoised=True, model_kwargs=self.model_kwargs(labels)
        )
        batch_size = x_start.shape[0]
        self.log("test/bpd", out["total_bpd"].mean(), batch_size=batch_size, sync_dist=True)
        self.log("test/prior_bpd", out["prior_bpd"].mean(), batch_size=batch_size, sync_dist=True)
        self.log("test/decoder_bpd", out["vb"][:, -1].mean(), batch_size=batch_size, sync_dist=True)

    # ---------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if hasattr(self.schedule_sampler, "state_dict"):
            checkpoint["schedule_sampler"] = self.schedule_sampler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("schedule_sampler")
        if state is not None and hasattr(self.schedule_sampler, "load_state_dict"):
            self.schedule_sampler.load_state_dict(state)
