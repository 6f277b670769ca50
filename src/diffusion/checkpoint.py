"""The checkpoint: its one layout, its atomic write, and the network and process it rebuilds.

train.py (through Lightning) and `python -m diffusion.convert` write the same layout::

    {
      "state_dict": {"model." + key: tensor, ...},     # the UNet's weights (DiffusionModule.model)
      "ema": {"0.9999": {key: tensor, ...}, ...},        # EMA weights per rate (train.py only)
      "phema": {"run_id": str, "stds": [...], ...},      # with callbacks.posthoc_ema: whose snapshots
      "hyper_parameters": {
        "run_config": {"model": {...}, "diffusion": {...}, "data": {...}, ...},  # plain values
        "image_size": int, "in_channels": int, "num_classes": int | None,
        "label_dropout": float,                          # > 0: the UNet has a null class
      },
      "global_step": int, ...                            # Lightning's own entries
      "distilled": {"method", "steps", "sampler": {...}},  # distill.py's students only
    }

A run with post-hoc EMA (`diffusion.training.posthoc_ema`) also keeps snapshots of its
power-function averages beside its checkpoints, one file per step, written atomically::

    <checkpoint folder>/phema/phema-0000100.pt  {"format": 1, "step": 100, "run_id": str,
                                                  "profiles": [{"std", "gamma", "state_dict"}, ...]}

`load_posthoc_ema` rebuilds the weights of any σ_rel from them (EDM2, arXiv 2312.02696).

The run config's ``model`` and ``diffusion`` entries are Hydra ``_target_`` configs, so the
network and the process are rebuilt from the checkpoint alone. This module also decides
how a UNet is finished from a process and the data's shape (`build_unet`), which training
calls too, so that the two can never build different networks. It imports neither Lightning
nor anything from training.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from torch import nn

from diffusion.process.gaussian_diffusion import GaussianDiffusion
from diffusion.process.posthoc_ema import combine_state_dicts, gamma_from_std, solve_coefficients
from diffusion.utils.atomic import atomic_write

MODEL_PREFIX = "model."  # the UNet's keys in "state_dict": DiffusionModule.model
# Keys of the model config that say how to run the UNet rather than what it is.
RUNTIME_KEYS = ("channels_last", "compile", "compile_mode")
# torch.compile's modes (model.compile_mode); null is its default mode.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Targets that moved since a checkpoint was written, so that older checkpoints still load.
MOVED_TARGETS = {
    f"diffusion.training.data.{name}DataModule": f"diffusion.data.{name}Data"
    for name in ("Digits", "Cifar10", "CelebA", "ImageNet64", "ImageFolder")
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or cannot serve the request."""


# ------------------------------------------------------------------------------ the network
def split_model_config(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the UNet's config, the run-time options ``channels_last``, ``compile`` and
    ``compile_mode`` that are set)."""
    unet = {key: config[key] for key in config if key not in RUNTIME_KEYS}
    runtime = {key: config[key] for key in RUNTIME_KEYS if config.get(key) is not None}
    for key in ("channels_last", "compile"):
        if key in runtime:
            runtime[key] = bool(runtime[key])
    return unet, runtime


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

    The output width is the process's (2C for learned variances, mean part first), and the
    null class of classifier-free guidance follows ``label_dropout > 0``, so that no two
    config keys can disagree about either.
    """
    return model(
        image_size=image_size,
        in_channels=in_channels,
        out_channels=diffusion.model_output_channels(in_channels),
        num_classes=num_classes,
        null_class=label_dropout > 0,
    )


def prepare_network(net: nn.Module, *, channels_last: bool = False, compile: bool = False,
                    compile_mode: str | None = None) -> nn.Module:
    """Apply the run-time options in place: NHWC weights, and ``nn.Module.compile`` (which
    keeps the state-dict keys) in ``compile_mode`` (`COMPILE_MODES`; None: torch.compile's
    default). Inputs must be NHWC too for channels_last to pay."""
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if compile:
        # no mode argument unless one is chosen: a non-Inductor backend refuses one
        net.compile(**({} if compile_mode is None else {"mode": compile_mode}))
    return net


# ------------------------------------------------------------------------------ writing
def checkpoint_dict(unet_state: dict[str, torch.Tensor], run_config: dict[str, Any], *,
                    image_size: int, in_channels: int, num_classes: int | None,
                    **extra: Any) -> dict[str, Any]:
    """A checkpoint in the layout above from a bare UNet state dict (a converted model)."""
    return {
        "state_dict": {MODEL_PREFIX + key: value for key, value in unet_state.items()},
        "hyper_parameters": {"run_config": run_config, "image_size": image_size,
                             "in_channels": in_channels, "num_classes": num_classes,
                             "label_dropout": 0.0},
        **extra,
    }


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (`diffusion.utils.atomic`): a crash or a full
    disk leaves the previous file intact. Raises OSError naming the file on failure."""
    path = os.fspath(path)
    try:
        with atomic_write(path) as handle:
            torch.save(checkpoint, handle)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        previous = "the previous file is intact" if os.path.exists(path) else "no file was left"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OSError(f"writing checkpoint {path} failed ({reason}); {previous}") from err


# ------------------------------------------------------------------------------ reading
@dataclass
class LoadedCheckpoint:
    model: nn.Module
    diffusion: GaussianDiffusion
    config: dict[str, Any]
    image_shape: tuple[int, int, int]
    num_classes: int | None
    weights: str  # which weights were loaded: "ema_<rate>", "raw" or "phema_<σ_rel>"
    global_step: int | None
    posthoc_ema: dict[str, Any] | None = None  # the checkpoint's "phema" entry: its run kept snapshots
    distilled: dict[str, Any] | None = None  # distill.py's students: method, steps and the sampler config


def read_checkpoint(path: str) -> dict[str, Any]:
    """torch.load with one-line errors for a missing or corrupt file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path} holds a {type(checkpoint).__name__}, not a checkpoint (a dict with state_dict and "
            "hyper_parameters); pass a checkpoint written by train.py or python -m diffusion.convert"
        )
    return checkpoint


def select_weights(checkpoint: dict[str, Any], weights: str, path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The UNet state dict for ``weights``: "ema" (the first rate), "raw", or a rate like "0.999"."""
    ema = checkpoint.get("ema") or {}
    if weights == "raw" or (weights == "ema" and not ema):
        if not isinstance(checkpoint.get("state_dict"), dict):
            raise CheckpointError(f"{path} holds no state_dict (the network's weights); it is not a complete checkpoint")
        state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
        return state, "raw"
    key = next(iter(ema)) if weights == "ema" else str(weights)
    if key not in ema:
        available = ", ".join(["raw", "ema", *sorted(ema)]) if ema else "raw (it holds no EMA weights)"
        raise CheckpointError(f"weights={weights!r} not in {path}; available: {available}")
    return ema[key], f"ema_{key}"


def _current_targets(config: Any) -> Any:
    """``config`` with every moved ``_target_`` (`MOVED_TARGETS`) renamed."""
    if isinstance(config, dict):
        return {key: MOVED_TARGETS.get(value, value) if key == "_target_" else _current_targets(value)
                for key, value in config.items()}
    if isinstance(config, list):
        return [_current_targets(value) for value in config]
    return config


def run_config(checkpoint: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run config, the hyper-parameters) of a checkpoint, with the data's shape in the
    hyper-parameters. Checkpoints converted before the layout was shared kept the config
    under ``config`` and the shape in its ``data`` entry."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    config = hparams.get("run_config") or hparams.get("config")
    if not config or "model" not in config or "diffusion" not in config:
        bare = bool(checkpoint) and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
        hint = ("it is a bare state dict: convert an improved-diffusion model with python -m diffusion.convert"
                if bare else "expected a checkpoint written by train.py or python -m diffusion.convert")
        raise CheckpointError(
            f"{path} holds no run config (hyper_parameters.run_config with model and diffusion); {hint}"
        )
    data = config.get("data") or {}
    for key, legacy in (("image_size", "image_size"), ("in_channels", "channels"), ("num_classes", "num_classes")):
        hparams.setdefault(key, data.get(legacy))
    absent = [key for key in ("image_size", "in_channels") if hparams.get(key) is None]
    if absent:
        raise CheckpointError(f"{path} does not say the data's {' and '.join(absent)} (hyper_parameters); "
                              "it is not a complete checkpoint")
    return _current_targets(dict(config)), hparams


def build_diffusion(config: dict[str, Any], path: str) -> GaussianDiffusion:
    """The process of a run config (its ``diffusion`` entry); CheckpointError if it cannot be built."""
    try:
        return hydra.utils.instantiate(config["diffusion"])
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise CheckpointError(f"{path}: the run config's diffusion cannot be built: {cause}") from cause


def load_checkpoint(path: str, weights: str = "ema") -> LoadedCheckpoint:
    """Rebuild the UNet and the process from a checkpoint, with the chosen weights, in eval mode."""
    checkpoint = read_checkpoint(path)
    config, hparams = run_config(checkpoint, path)
    diffusion = build_diffusion(config, path)
    unet_config, _ = split_model_config(config["model"])  # the jobs choose their own run-time options
    model = build_unet(
        hydra.utils.instantiate(unet_config, _partial_=True), diffusion,
        image_size=hparams["image_size"], in_channels=hparams["in_channels"],
        num_classes=hparams["num_classes"], label_dropout=hparams.get("label_dropout", 0.0),
    )
    state, chosen = select_weights(checkpoint, weights, path)
    load_weights(model, state, path)
    model.eval()
    return LoadedCheckpoint(
        model=model, diffusion=diffusion, config=config,
        image_shape=(hparams["in_channels"], hparams["image_size"], hparams["image_size"]),
        num_classes=hparams["num_classes"], weights=chosen, global_step=checkpoint.get("global_step"),
        posthoc_ema=checkpoint.get(PHEMA_KEY), distilled=checkpoint.get("distilled"),
    )


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """``state`` into ``model``; CheckpointError naming ``path`` unless every key fits."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the configured UNet "
            f"(missing {sorted(missing)[:3]}..., unexpected {sorted(unexpected)[:3]}...)"
        )


# ------------------------------------------------------------------------------ post-hoc EMA
PHEMA_DIR = "phema"  # <checkpoint folder>/phema/
PHEMA_KEY = "phema"  # the checkpoint's entry: the run id of its snapshots, their σ_rel and γ
SNAPSHOT_FORMAT = 1
_SNAPSHOT_NAME = re.compile(r"phema-(\d+)\.pt")


def snapshot_path(folder: str, step: int) -> str:
    """The snapshot of optimizer step ``step``: named by the step alone, so that a resumed run
    writes exactly the files the uninterrupted one would."""
    return os.path.join(folder, f"phema-{step:07d}.pt")


def snapshot_steps(folder: str) -> list[int]:
    """The steps of the snapshots in ``folder``, in order (none when it does not exist)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(m.group(1)) for m in map(_SNAPSHOT_NAME.fullmatch, names) if m)


def read_snapshot(path: str) -> dict[str, Any]:
    """A snapshot, its tensors memory-mapped (read when used); CheckpointError if unreadable."""
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read post-hoc EMA snapshot {path}: {reason}; delete it (it is "
                              "left out then) or rerun the training from a checkpoint before it") from None
    if not isinstance(snapshot, dict) or snapshot.get("format") != SNAPSHOT_FORMAT:
        raise CheckpointError(f"{path} is not a post-hoc EMA snapshot of this version (format {SNAPSHOT_FORMAT})")
    return snapshot


def _other_run(path: str, owner: Any, run_id: Any) -> CheckpointError:
    folder = os.path.dirname(path)
    return CheckpointError(
        f"{path} is a post-hoc EMA snapshot of another run (run id {owner}; "
        f"{'this is a new run' if run_id is None else f'this run is {run_id}'}), "
        f"and the two runs' snapshots must not mix: resume that run (ckpt_path=last in its folder), "
        f"train in another folder (hydra.run.dir=...), or move {folder} away"
    )


def check_snapshot_folder(folder: str, run_id: str | None) -> list[int]:
    """The steps of ``folder``'s snapshots, all written by the run ``run_id`` (None: a new
    run, which owns none); CheckpointError naming the first snapshot of another run."""
    steps = snapshot_steps(folder)
    for step in steps:
        owner = read_snapshot(snapshot_path(folder, step)).get("run_id")
        if owner != run_id:
            raise _other_run(snapshot_path(folder, step), owner, run_id)
    return steps


def set_snapshots_aside(folder: str) -> str | None:
    """Rename a snapshot folder to an unused ``<folder>-superseded-<n>`` beside it, so that a new
    run starts with none and nothing is lost; returns the new name (None: no snapshots)."""
    if not snapshot_steps(folder):
        return None
    n = 1
    while os.path.exists(f"{folder}-superseded-{n}"):
        n += 1
    os.rename(folder, f"{folder}-superseded-{n}")
    return f"{folder}-superseded-{n}"


def save_snapshot(folder: str, step: int, run_id: str, profiles: list[dict[str, Any]]) -> str:
    """Write the snapshot of ``step`` (``profiles``: dicts of std, gamma, state_dict)
    atomically; a snapshot of that step from another run is an error, never replaced."""
    path = snapshot_path(folder, step)
    if os.path.exists(path):
        owner = read_snapshot(path).get("run_id")
        if owner != run_id:
            raise _other_run(path, owner, run_id)
    save_checkpoint({"format": SNAPSHOT_FORMAT, "step": step, "run_id": run_id, "profiles": profiles}, path)
    return path


def posthoc_ema_state(folder: str, std: float, *, max_step: int | None = None,
                      run_id: str | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """(the weights of the power-function EMA of relative width ``std`` = σ_rel at the last
    snapshot of ``folder`` up to ``max_step``, that step), the least-squares combination of
    every profile of those snapshots (EDM2 App. C.3; `diffusion.process.posthoc_ema`).
    CheckpointError when there is no snapshot, or one of another run than ``run_id``."""
    steps = [s for s in snapshot_steps(folder) if max_step is None or s <= max_step]
    if not steps:
        up_to = f" up to the checkpoint's step {max_step}" if max_step is not None else ""
        raise CheckpointError(
            f"ema_std={std}: {folder} holds no post-hoc EMA snapshots (phema-*.pt){up_to}; train with "
            "callbacks.posthoc_ema (python train.py 'callbacks=[default,posthoc_ema]'; the digits "
            "quickstart keeps them), or leave ema_std out to use the checkpoint's EMA weights"
        )
    snapshots = [read_snapshot(snapshot_path(folder, step)) for step in steps]  # mmap: nothing read yet
    owners = {snapshot.get("run_id") for snapshot in snapshots}
    if owners != {run_id}:
        raise CheckpointError(
            f"ema_std={std}: the snapshots in {folder} are of run(s) {sorted(map(str, owners))}, not of the "
            f"checkpoint's run ({run_id or 'trained without callbacks.posthoc_ema'}); pass a checkpoint "
            "of the run that wrote them"
        )
    profiles = [(snapshot["step"], profile) for snapshot in snapshots for profile in snapshot["profiles"]]
    coefficients = solve_coefficients([step for step, _ in profiles], [p["gamma"] for _, p in profiles],
                                      target_gamma=gamma_from_std(std), target_step=steps[-1])
    return combine_state_dicts((p["state_dict"] for _, p in profiles), coefficients), steps[-1]


def load_posthoc_ema(loaded: LoadedCheckpoint, path: str, std: float) -> LoadedCheckpoint:
    """``loaded`` (the checkpoint at ``path``) with the post-hoc EMA weights of σ_rel ``std``
    at its step (`posthoc_ema_state`), from the snapshots in ``<folder of path>/phema/``."""
    folder = os.path.join(os.path.dirname(os.path.abspath(path)), PHEMA_DIR)
    state, step = posthoc_ema_state(folder, std, max_step=loaded.global_step,
                                    run_id=(loaded.posthoc_ema or {}).get("run_id"))
    load_weights(loaded.model, state, path)
    return dataclasses.replace(loaded, weights=f"phema_{std:g}@{step}")
