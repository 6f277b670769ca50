"""`train(cfg)`: from a composed Hydra config to a trained, tested checkpoint.

`train.py` is a thin `@hydra.main` wrapper around this function, and the tests call it
with configs they compose themselves (the split of lightning-hydra-template).

Nothing is written before everything has been checked: the config keys, the checkpoint to
resume from and the dataset (`diffusion.training.preflight.prepare`), then every object
built from the config (a constructor's complaint names its config group, through
`diffusion.utils.errors.config_errors`), the optimizer, and whether the checkpoint's weights
fit the model. Only then do ``config.yaml``, checkpoints and metrics appear in the run folder.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import hydra
import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from diffusion.checkpoint import split_model_config
from diffusion.data.image_data import ImageData
from diffusion.data.module import DataModule
from diffusion.training.module import DiffusionModule
from diffusion.training.preflight import Prepared, check_resume_weights, prepare
from diffusion.training.resume import CheckpointOnSignal, Preempted
from diffusion.utils.errors import ConfigError, config_errors
from diffusion.utils.host_memory import retain_freed_memory

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None, name: str) -> dict[str, Any]:
    """Instantiate every entry of a group of named objects (callbacks, loggers); a
    constructor's complaint names its entry (``callbacks.ema.decays=...``)."""
    objects = {}
    for key, node in (group or {}).items():
        if node is not None and "_target_" in node:
            with config_errors(f"{name}.{key}", ValueError, TypeError):
                objects[key] = hydra.utils.instantiate(node)
    return objects


def build_module(cfg: DictConfig, data: ImageData) -> DiffusionModule:
    """The module, finished with the data's shape and labels, holding the resolved config."""
    num_classes = data.num_classes if cfg.class_cond else None
    if cfg.model.get("out_channels") is not None:
        raise ConfigError(
            f"model.out_channels={cfg.model.out_channels} is set, but the output width follows "
            f"diffusion.model_var_type={cfg.diffusion.model_var_type} (2C for learned variances, "
            "else C); remove model.out_channels"
        )
    # The run config is passed after instantiation: Hydra would otherwise try to
    # instantiate every _target_ inside it.
    with config_errors("module", ValueError, TypeError):
        module_factory = hydra.utils.instantiate(cfg.module, _partial_=True)
    unet_cfg, runtime = split_model_config(cfg.model)
    with config_errors("model", ValueError, TypeError):
        unet_factory = hydra.utils.instantiate(unet_cfg)
    with config_errors("diffusion", ValueError, TypeError):
        diffusion = hydra.utils.instantiate(cfg.diffusion)

    def build_unet(**kwargs: Any) -> torch.nn.Module:  # the module builds it; its checks name model.*
        with config_errors("model", ValueError, TypeError):
            return unet_factory(**kwargs)

    with config_errors("module", ValueError, TypeError):
        module = module_factory(
            model=build_unet, **runtime, diffusion=diffusion, image_size=data.image_size,
            in_channels=data.channels, num_classes=num_classes,
            run_config=OmegaConf.to_container(cfg, resolve=True),
        )
    with config_errors("module.optimizer", ValueError, TypeError):  # built for real once fit starts
        module.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    return module


def build_trainer(cfg: DictConfig, module: DiffusionModule) -> L.Trainer:
    """The Trainer with its callbacks and loggers; callbacks that can check themselves
    against the process (`SampleGrid`'s DDIM steps) do so now rather than at set-up."""
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    for key, callback in callbacks.items():
        if callable(getattr(callback, "check", None)):
            with config_errors(f"callbacks.{key}"):
                callback.check(module.diffusion)
    loggers = list(instantiate_group(cfg.get("logger"), "logger").values())
    with config_errors("trainer", ValueError, TypeError, library=(MisconfigurationException,)):
        return hydra.utils.instantiate(cfg.trainer, callbacks=list(callbacks.values()), logger=loggers or False)


def train(cfg: DictConfig, prepared: Prepared | None = None) -> dict[str, float]:
    """Fit, then (optionally) report test bits/dim with the EMA weights.

    ``prepared``: what `prepare(cfg)` returned, when the caller ran it already (train.py
    does, before importing Lightning). Returns the metrics of the last validation and of
    the test, as floats. Raises `Preempted` when SIGTERM or Ctrl-C stopped the run.
    """
    prepared = prepared or prepare(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    if cfg.get("retain_freed_memory"):
        retain_freed_memory()

    module = build_module(cfg, prepared.data)
    if prepared.resume is not None:
        check_resume_weights(prepared.resume, prepared.resume_path, module)
        prepared.resume = None  # the memory map: Lightning reads the file itself
    datamodule = DataModule(prepared.data)
    trainer = build_trainer(cfg, module)
    if trainer.is_global_zero:
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        OmegaConf.save(cfg, os.path.join(trainer.default_root_dir, "config.yaml"), resolve=True)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=prepared.resume_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test_after_fit"):
            for result in trainer.test(module, datamodule=datamodule, verbose=False):
                metrics.update({k: float(v) for k, v in result.items()})
            if trainer.is_global_zero:
                log.info("test bits/dim: %.4f", metrics.get("test/bpd", float("nan")))
    except SIGTERMException:  # Lightning's SystemExit, status 0: a scheduler would see a finished job
        raise preempted(trainer, cfg) from None
    return metrics


def preempted(trainer: L.Trainer, cfg: DictConfig) -> Preempted:
    """What stopped the run, at which step, and the checkpoint saved on the way out."""
    handler = next((c for c in trainer.callbacks if isinstance(c, CheckpointOnSignal)), None)
    return Preempted(
        (handler.signal if handler else None) or signal.SIGTERM, trainer.global_step, trainer.max_steps,
        handler.saved if handler else None, str(cfg.output_dir), report=trainer.is_global_zero,
    )
