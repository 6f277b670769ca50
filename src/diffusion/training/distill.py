"""Progressive distillation rounds (Salimans & Ho 2022, arXiv 2202.00512): `distill(cfg)`.

From a checkpoint of train.py or ``python -m diffusion.convert`` (the teacher, sampled with
DDIM on a σ grid of 2N levels), each round trains a student of N levels, initialised from its
teacher, to match two teacher steps with one (``diffusion.sampling.distillation``); the
student (its EMA weights) then teaches the next round, N/2, down to ``student_steps``.

A round is a Lightning fit with the EMA callback, atomic checkpoints (``last.ckpt`` every
``checkpoint_every`` steps) and a CSV log in ``<output_dir>/round_<N>/``, and ends with
``student.ckpt`` in the project's checkpoint layout (``diffusion.checkpoint``), plus an entry
``distilled`` that names the sampler it was trained for (``sample.py sampler=student``). A
rerun with the same settings skips finished rounds and resumes the unfinished one from its
``last.ckpt``; a run folder written with other settings is refused, not reused.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import json
import logging
import os
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion.checkpoint import (
    MODEL_PREFIX,
    CheckpointError,
    load_checkpoint,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)
from diffusion.data.module import DataModule
from diffusion.sampling.distillation import (
    SIGMA_DATA,
    consistency_function,
    consistency_levels,
    ddim_step,
    nested_grids,
    student_target,
    truncated_snr_weight,
)
from diffusion.sampling.sigmas import Denoiser
from diffusion.training.checkpoint_io import AtomicCheckpointIO, CheckpointAfterLogs
from diffusion.training.ema import EMA
from diffusion.training.loggers import ResumableCSVLogger
from diffusion.utils.errors import ConfigError
from diffusion.utils.host_memory import retain_freed_memory

log = logging.getLogger(__name__)

STUDENT_FILE = "student.ckpt"
DISTILLED_KEY = "distilled"  # the checkpoint entry that names the student's sampler and its teacher


class Distillation(L.LightningModule, abc.ABC):
    """What both methods share: the student ``model`` (the only sub-module that the project's
    layout saves as ``model.*``), the frozen teacher (in a list: not a sub-module, rebuilt
    from its file), the optimizer, and checkpoints in the project's layout with the run key."""

    method = ""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, diffusion, *, steps: int, lr: float,
                 num_classes: int | None, clip: bool = True, hyper_parameters: dict | None = None,
                 run_key: str | None = None):
        super().__init__()
        self.model = student
        self._teacher = [teacher.eval().requires_grad_(False)]
        self.diffusion, self.steps, self.lr, self.num_classes = diffusion, steps, lr, num_classes
        self.clip = clip
        self.checkpoint_meta = (hyper_parameters or {}, run_key)

    @property
    def teacher(self) -> torch.nn.Module:
        return self._teacher[0]

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def model_kwargs(self, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"y": labels} if self.num_classes is not None and labels is not None else {}

    def denoisers(self, labels: torch.Tensor | None) -> tuple[Denoiser, Denoiser]:
        """(student, teacher) denoisers, both clipped to [−1, 1] as they sample when
        ``clip``: an unclipped student would be pulled, with the weight 1/σ² of the smallest
        levels, towards values beyond the data range that sampling clips away anyway (losses
        of 60 where the rest are 0.01 were seen on the digits' saturated background)."""
        kwargs = self.model_kwargs(labels)
        return (Denoiser(self.diffusion, self.model, kwargs, clip_denoised=self.clip),
                Denoiser(self.diffusion, self.teacher, kwargs, clip_denoised=self.clip))

    @abc.abstractmethod
    def num_levels(self) -> int:
        """How many training levels (or steps) a batch draws its one from."""

    @abc.abstractmethod
    def distillation_loss(self, x_start: torch.Tensor, labels: torch.Tensor | None, step: int) -> torch.Tensor:
        """The loss of level (or step) ``step`` on clean images ``x_start``."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x_start, labels = batch
        step = int(torch.randint(self.num_levels(), ()))
        loss = self.distillation_loss(x_start.float(), labels, step)
        self.log("train/loss", loss, prog_bar=True, batch_size=x_start.shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The project's layout (``diffusion.checkpoint``), so that an unfinished round's
        last.ckpt loads like any checkpoint, and the run key that it belongs to."""
        hparams, key = self.checkpoint_meta
        checkpoint["hyper_parameters"] = hparams
        checkpoint[DISTILLED_KEY] = {"method": self.method, "steps": self.steps, "run_key": key}


class ProgressiveDistillation(Distillation):
    """One round: the student (N levels) learns two steps of the frozen teacher.

    Each batch draws one student step i < N (the grid's levels σ_i > σ_{i+1}, the teacher's
    midpoint σ_{2i+1}) and noises the data to x̃ = x_0 + σ_i ε; the loss is
    max(1/σ_i², 1) · mean((D_student(x̃; σ_i) − D_s)²) with D_s the target of the module doc of
    ``diffusion.sampling.distillation``. Both denoisers are clipped to [−1, 1] as when they
    sample (``clip``, sample.py's ``clip_denoised``).
    """

    method = "progressive"

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, diffusion, *, steps: int,
                 schedule: str, rho: float, sigma_max: float | None, sigma_min: float | None, **kwargs: Any):
        super().__init__(student, teacher, diffusion, steps=steps, **kwargs)
        self.student_sigmas, self.teacher_sigmas = nested_grids(diffusion, steps, schedule, rho, sigma_max, sigma_min)

    def num_levels(self) -> int:
        return self.steps

    def distillation_loss(self, x_start: torch.Tensor, labels: torch.Tensor | None, step: int) -> torch.Tensor:
        """The loss of student step ``step`` (0-based) on clean images ``x_start``."""
        sigma, sigma_next = float(self.student_sigmas[step]), float(self.student_sigmas[step + 1])
        sigma_mid = float(self.teacher_sigmas[2 * step + 1])
        student, teacher = self.denoisers(labels)
        x = x_start + sigma * torch.randn_like(x_start)
        with torch.no_grad():
            target = student_target(teacher, x, sigma, sigma_mid, sigma_next)
        return truncated_snr_weight(sigma) * (student(x, sigma).float() - target.float()).pow(2).mean()


class ConsistencyDistillation(Distillation):
    """Consistency distillation (Song et al. 2023, arXiv 2303.01469, Alg. 2) with the
    boundary condition built into f (``diffusion.sampling.distillation``) and a target
    network θ⁻ ← μ θ⁻ + (1 − μ) θ after every optimizer step (``target``, a sub-module so that
    a resumed round has it; the EMA callback keeps the weights that are sampled).

    Each batch draws one pair of adjacent training levels σ_n < σ_{n+1} and noises the data to
    x̃ = x_0 + σ_{n+1} z; the teacher's DDIM step gives x̂ at σ_n; the loss is
    mean((f_θ(x̃, σ_{n+1}) − f_θ⁻(x̂, σ_n))²), the squared L2 metric (the paper's LPIPS needs
    ImageNet features that the digits do not suit).
    """

    method = "consistency"

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, diffusion, *, steps: int,
                 num_levels: int, rho: float, sigma_max: float | None, target_decay: float, **kwargs: Any):
        super().__init__(student, teacher, diffusion, steps=steps, **kwargs)
        self.target = copy.deepcopy(student).requires_grad_(False)
        self.levels = consistency_levels(diffusion, num_levels, rho, sigma_max)
        self.sigma_min, self.target_decay = float(self.levels[0]), float(target_decay)

    def num_levels(self) -> int:
        return len(self.levels) - 1

    def distillation_loss(self, x_start: torch.Tensor, labels: torch.Tensor | None, step: int) -> torch.Tensor:
        sigma, sigma_next = float(self.levels[step]), float(self.levels[step + 1])
        student, teacher = self.denoisers(labels)
        target = Denoiser(self.diffusion, self.target, self.model_kwargs(labels), clip_denoised=self.clip)
        x = x_start + sigma_next * torch.randn_like(x_start)
        with torch.no_grad():
            x_hat = ddim_step(x, teacher(x, sigma_next), sigma_next, sigma)
            goal = consistency_function(target, x_hat, sigma, self.sigma_min)
        prediction = consistency_function(student, x, sigma_next, self.sigma_min)
        return (prediction.float() - goal.float()).pow(2).mean()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        target, current = list(self.target.parameters()), list(self.model.parameters())
        with torch.no_grad():
            torch._foreach_lerp_(target, [p.detach() for p in current], 1.0 - self.target_decay)


def student_sampler(steps: int, cfg: DictConfig) -> dict[str, Any]:
    """The sampler a student of ``steps`` levels was trained for. Progressive: deterministic
    DDIM on its grid, which is `EulerAncestralSampler` with η = 0 (x̃' = D + (σ'/σ)(x̃ − D)).
    Consistency: `ConsistencySampler` (Song et al. 2023, Alg. 1) from σ_max."""
    grid = {"rho": float(cfg.rho), "sigma_max": cfg.sigma_max, "guidance_scale": None}
    if cfg.method == "consistency":
        return {"_target_": "diffusion.sampling.ConsistencySampler", "steps": steps, "schedule": "karras",
                "sigma_min": None, "sigma_data": SIGMA_DATA, **grid}
    return {"_target_": "diffusion.sampling.EulerAncestralSampler", "steps": steps, "schedule": cfg.schedule,
            "sigma_min": cfg.sigma_min, "eta": 0.0, "s_noise": 1.0, **grid}


def round_steps(cfg: DictConfig) -> list[int]:
    """N of each round: start_steps, start_steps/2, ..., student_steps."""
    start, final = int(cfg.start_steps), int(cfg.student_steps)
    if final < 1 or start <= final or start % final or (start // final) & (start // final - 1):
        raise ConfigError(
            f"start_steps={start} and student_steps={final}: each round halves the steps, so "
            f"start_steps must be student_steps times a power of two (e.g. start_steps={max(final, 1) * 8})"
        )
    steps, n = [], start
    while n >= final:
        steps.append(n)
        n //= 2
    return steps


def run_key(cfg: DictConfig) -> str:
    """What a run folder was written with: a different key is a different run. The chain of
    rounds is fixed by its start, so ``student_steps`` is not part of it: a rerun with fewer
    final steps reuses the finished rounds and continues."""
    teacher = os.path.realpath(cfg.ckpt)
    settings = {key: cfg[key] for key in ("weights", "schedule", "rho", "sigma_max", "sigma_min", "start_steps",
                                          "steps_per_round", "batch_size", "lr", "ema_decay", "seed")}
    if cfg.method == "consistency":  # its own chain: one round; the sampler's steps are free
        settings.update(method=cfg.method, consistency_levels=cfg.consistency_levels, target_decay=cfg.target_decay)
        del settings["start_steps"]
    settings["teacher"] = [teacher, os.path.getsize(teacher), int(os.path.getmtime(teacher))]
    return hashlib.sha256(json.dumps(OmegaConf.to_container(OmegaConf.create(settings)), sort_keys=True)
                          .encode()).hexdigest()[:16]


def check_round(path: str, key: str) -> None:
    found = (read_checkpoint(path).get(DISTILLED_KEY) or {}).get("run_key")
    if found != key:
        raise CheckpointError(
            f"{path} was written by a distillation with other settings (run key {found}, this run "
            f"{key}): choose a new output_dir (hydra.run.dir=...) or delete that folder"
        )


def student_checkpoint(module: Distillation, ema_state: dict[str, torch.Tensor], hparams: dict,
                       cfg: DictConfig, key: str, steps: int, global_step: int) -> dict[str, Any]:
    """The student in the project's layout, its EMA weights first (what sample.py loads)."""
    raw = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
    return {
        "state_dict": {MODEL_PREFIX + k: v for k, v in raw.items()},
        "ema": {str(cfg.ema_decay): {k: v.detach().cpu() for k, v in ema_state.items()}},
        "hyper_parameters": hparams,
        "global_step": global_step,
        DISTILLED_KEY: {"method": cfg.method, "steps": steps, "sampler": student_sampler(steps, cfg),
                        "teacher": os.path.realpath(cfg.ckpt), "run_key": key},
    }


def fit_round(cfg: DictConfig, student: torch.nn.Module, teacher: torch.nn.Module, loaded, data, steps: int,
              round_dir: str, hparams: dict, key: str) -> tuple[Distillation, dict[str, torch.Tensor], int]:
    """Fit one round (resuming its last.ckpt); returns the module, its EMA weights and the step."""
    common = {"steps": steps, "lr": cfg.lr, "num_classes": loaded.num_classes, "hyper_parameters": hparams,
              "run_key": key, "rho": cfg.rho, "sigma_max": cfg.sigma_max}
    if cfg.method == "consistency":
        module = ConsistencyDistillation(student, teacher, loaded.diffusion, num_levels=cfg.consistency_levels,
                                         target_decay=cfg.target_decay, **common)
    else:
        module = ProgressiveDistillation(student, teacher, loaded.diffusion, schedule=cfg.schedule,
                                         sigma_min=cfg.sigma_min, **common)
    ema = EMA(decays=[cfg.ema_decay])
    checkpoints = os.path.join(round_dir, "checkpoints")
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=0,
                                                every_n_train_steps=cfg.checkpoint_every)
    trainer = L.Trainer(
        accelerator=cfg.accelerator, devices=1, precision=cfg.precision, max_steps=cfg.steps_per_round,
        # train.py's logger and checkpoint order: a resumed round keeps the rows logged before
        # the interruption, and no checkpoint reaches the disk before its step's row
        max_epochs=-1, gradient_clip_val=cfg.gradient_clip_val, callbacks=[ema, CheckpointAfterLogs(), saver],
        logger=ResumableCSVLogger(round_dir, name="csv", version=""),
        plugins=[AtomicCheckpointIO()], default_root_dir=round_dir, enable_progress_bar=cfg.progress,
        enable_model_summary=False, log_every_n_steps=min(50, cfg.steps_per_round), num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    last = os.path.join(checkpoints, "last.ckpt")
    trainer.fit(module, datamodule=DataModule(data), ckpt_path=last if os.path.isfile(last) else None)
    with ema.swapped(module):
        averaged = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}
    return module, averaged, trainer.global_step


def check_settings(cfg: DictConfig) -> None:
    """One-line errors naming the key, before anything is read or written."""
    if cfg.method not in ("progressive", "consistency"):
        raise ConfigError(f"method={cfg.method!r}: choose method=progressive or method=consistency")
    if cfg.method == "consistency" and not 0.0 <= float(cfg.target_decay) < 1.0:
        raise ConfigError(f"target_decay={cfg.target_decay!r} must be in [0, 1), e.g. target_decay=0.95")
    for key in ("steps_per_round", "batch_size", "checkpoint_every"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]!r} must be a positive integer")
    if not float(cfg.lr) > 0:
        raise ConfigError(f"lr={cfg.lr!r} must be positive, e.g. lr=1e-4")
    if not 0.0 <= float(cfg.ema_decay) < 1.0:
        raise ConfigError(f"ema_decay={cfg.ema_decay!r} must be in [0, 1), e.g. ema_decay=0.995")


def distill(cfg: DictConfig) -> str:
    """Run every round; returns the path of the final student's checkpoint."""
    retain_freed_memory()  # glibc keeps freed host memory for the next batch (utils/host_memory.py)
    check_settings(cfg)
    loaded = load_checkpoint(cfg.ckpt, weights=cfg.weights)
    hparams = dict(read_checkpoint(cfg.ckpt)["hyper_parameters"])
    if cfg.method == "consistency":
        if isinstance(cfg.student_steps, bool) or not isinstance(cfg.student_steps, int) or cfg.student_steps < 1:
            raise ConfigError(f"student_steps={cfg.student_steps!r} must be a positive integer (1: one-step sampling)")
        consistency_levels(loaded.diffusion, cfg.consistency_levels, cfg.rho, cfg.sigma_max)  # refuse early
        rounds = [("consistency", int(cfg.student_steps))]
    else:
        rounds = [(f"round_{n:04d}", n) for n in round_steps(cfg)]
        for _, n in rounds:
            nested_grids(loaded.diffusion, n, cfg.schedule, cfg.rho, cfg.sigma_max, cfg.sigma_min)  # refuse early
    data_cfg = OmegaConf.create(loaded.config["data"])
    data_cfg.batch_size = int(cfg.batch_size)
    data = hydra.utils.instantiate(data_cfg)
    key = run_key(cfg)
    for folder, _ in rounds:  # a folder of another run is refused before anything is written
        for name in (STUDENT_FILE, os.path.join("checkpoints", "last.ckpt")):
            if os.path.isfile(os.path.join(cfg.output_dir, folder, name)):
                check_round(os.path.join(cfg.output_dir, folder, name), key)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    os.makedirs(cfg.output_dir, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(cfg.output_dir, "config.yaml"), resolve=True)
    teacher = loaded.model
    path = None
    for folder, n in rounds:
        round_dir = os.path.join(cfg.output_dir, folder)
        path = os.path.join(round_dir, STUDENT_FILE)
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        if os.path.isfile(path):
            log.info("round N=%d: done already (%s)", n, path)
            load_weights(student, load_checkpoint(path).model.state_dict(), path)
        else:
            log.info("%s: %d optimizer steps, student of %d levels", folder, cfg.steps_per_round, n)
            module, averaged, step = fit_round(cfg, student, teacher, loaded, data, n, round_dir, hparams, key)
            save_checkpoint(student_checkpoint(module, averaged, hparams, cfg, key, n, step), path)
            load_weights(student, averaged, path)
        teacher = student.eval()
    final = os.path.join(cfg.output_dir, STUDENT_FILE)
    save_checkpoint(read_checkpoint(path), final)
    log.info("student of %d steps: %s (python sample.py ckpt=%s sampler=student)", rounds[-1][1], final, final)
    return final
