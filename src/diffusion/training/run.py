"""`train(cfg)`: from a composed Hydra config to a trained, tested checkpoint.

`train.py` is a thin `@hydra.main` wrapper around this function, and the tests call it
with configs they compose themselves (the split of lightning-hydra-template).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion.checkpoint import split_model_config
from diffusion.data.image_data import ImageData
from diffusion.data.module import DataModule
from diffusion.training.module import DiffusionModule
from diffusion.utils.host_memory import retain_freed_memory

log = logging.getLogger(__name__)


def instantiate_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a group of named objects (callbacks, loggers)."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def build_module(cfg: DictConfig, data: ImageData) -> DiffusionModule:
    """The module, finished with the data's shape and labels, holding the resolved config."""
    num_classes = data.num_classes if cfg.class_cond else None
    if cfg.class_cond and data.num_classes is None:
        raise ValueError(
            f"class_cond=true but the dataset {cfg.data._target_} has no labels; "
            "use class_cond=false or a labelled dataset"
        )
    if cfg.model.get("out_channels") is not None:
        raise ValueError(
            f"model.out_channels={cfg.model.out_channels} is set, but the output width follows "
            f"diffusion.model_var_type={cfg.diffusion.model_var_type} (2C for learned variances, "
            "else C); remove model.out_channels"
        )
    # The run config is passed after instantiation: Hydra would otherwise try to
    # instantiate every _target_ inside it.
    module_factory = hydra.utils.instantiate(cfg.module, _partial_=True)
    unet_cfg, runtime = split_model_config(cfg.model)
    return module_factory(
        model=hydra.utils.instantiate(unet_cfg),
        **runtime,
        diffusion=hydra.utils.instantiate(cfg.diffusion),
        image_size=data.image_size,
        in_channels=data.channels,
        num_classes=num_classes,
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then (optionally) report test bits/dim with the EMA weights.

    Returns the metrics of the last validation and of the test, as floats.
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    if cfg.get("retain_freed_memory"):
        retain_freed_memory()

    data: ImageData = hydra.utils.instantiate(cfg.data)
    module = build_module(cfg, data)
    datamodule = DataModule(data)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_list(cfg.get("callbacks")),
        logger=instantiate_list(cfg.get("logger")) or False,
    )
    if trainer.is_global_zero:
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        OmegaConf.save(cfg, os.path.join(trainer.default_root_dir, "config.yaml"), resolve=True)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test_after_fit"):
        for result in trainer.test(module, datamodule=datamodule, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
        if trainer.is_global_zero:
            log.info("test bits/dim: %.4f", metrics.get("test/bpd", float("nan")))
    return metrics
