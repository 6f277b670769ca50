"""Load a trained (or converted) checkpoint for sampling and evaluation.

A checkpoint written by train.py is a Lightning checkpoint whose ``hyper_parameters``
hold the fully composed run config (``config``) and the data's shape; its ``ema`` entry
holds the EMA weights of every rate under plain UNet keys. `python -m diffusion.convert`
writes the same layout from an improved-diffusion ``.pt`` file. Nothing else is needed to
rebuild the network and the process.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Any

import hydra
import torch
from torch import nn

from diffusion.process.gaussian_diffusion import GaussianDiffusion
from diffusion.training.module import build_unet, split_model_config


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or cannot serve the request."""


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    diffusion: GaussianDiffusion
    config: dict[str, Any]
    image_shape: tuple[int, int, int]
    num_classes: int | None
    weights: str  # which weights were loaded: "ema_<rate>" or "raw"
    global_step: int | None


def read_checkpoint(path: str) -> dict[str, Any]:
    """torch.load with one-line errors for a missing or corrupt file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None


def select_weights(checkpoint: dict[str, Any], weights: str, path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The UNet state dict for ``weights``: "ema" (the first rate), "raw", or a rate like "0.999"."""
    ema = checkpoint.get("ema") or {}
    if weights == "raw" or (weights == "ema" and not ema):
        prefix = "model."
        state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        return state, "raw"
    key = next(iter(ema)) if weights == "ema" else str(weights)
    if key not in ema:
        raise CheckpointError(
            f"weights={weights!r} not in {path}; available: raw, ema, " + ", ".join(sorted(ema))
        )
    return ema[key], f"ema_{key}"


def load_checkpoint(path: str, weights: str = "ema") -> LoadedCheckpoint:
    """Rebuild the UNet and the process from a checkpoint, with the chosen weights, in eval mode."""
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    config = hparams.get("run_config") or hparams.get("config")
    if not config or "model" not in config or "diffusion" not in config:
        raise CheckpointError(
            f"{path} holds no run config (hyper_parameters.config with model and diffusion); "
            "expected a checkpoint written by train.py or python -m diffusion.convert"
        )
    diffusion = hydra.utils.instantiate(config["diffusion"])
    # train.py stores the data's shape beside the config; diffusion.convert inside it.
    data = config.get("data") or {}
    image_size = hparams.get("image_size", data.get("image_size"))
    in_channels = hparams.get("in_channels", data.get("channels"))
    num_classes = hparams.get("num_classes", data.get("num_classes"))
    unet_config, _ = split_model_config(config["model"])  # the jobs choose their own run-time options
    model_factory = hydra.utils.instantiate(unet_config, _partial_=True)
    model = build_unet(
        model_factory, diffusion, image_size=image_size, in_channels=in_channels,
        num_classes=num_classes, label_dropout=hparams.get("label_dropout", 0.0),  # > 0: null class
    )
    state, chosen = select_weights(checkpoint, weights, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the configured UNet "
            f"(missing {sorted(missing)[:3]}..., unexpected {sorted(unexpected)[:3]}...)"
        )
    model.eval()
    shape = (in_channels, image_size, image_size)
    return LoadedCheckpoint(
        model=model, diffusion=diffusion, config=config, image_shape=shape,
        num_classes=num_classes, weights=chosen, global_step=checkpoint.get("global_step"),
    )
