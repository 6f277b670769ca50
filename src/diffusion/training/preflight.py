"""`prepare(cfg)`: everything train.py checks before it builds a model or writes a file.

In order: every config key with a domain (`config_checks`), the checkpoint to resume from
(``ckpt_path=last`` finds the newest ``last*.ckpt`` of the run's checkpoint folder or says
that there is none, ``last_or_new`` starts a new run then; the file must be readable), the dataset (built and split, so a missing
folder, an unreadable file or an empty folder is reported now), the labels that
``class_cond`` asks for, and whether the config builds the model that the checkpoint holds
(`RESUME_MUST_MATCH`, naming the keys that differ). Nothing here imports Lightning, so a
bad config or dataset fails in seconds; `run.train` goes on from what this returns.
"""

from __future__ import annotations

import glob
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion.checkpoint import (
    PHEMA_DIR,
    PHEMA_KEY,
    RUNTIME_KEYS,
    CheckpointError,
    check_snapshot_folder,
    run_config,
    set_snapshots_aside,
)
from diffusion.nets.unet import effective_levels
from diffusion.training.config_checks import check_train_config, show
from diffusion.utils.errors import ConfigError, UserError, config_errors

if TYPE_CHECKING:  # the datasets import torchvision: not needed to reject a config
    from diffusion.data.image_data import ImageData

log = logging.getLogger(__name__)

# What a checkpoint is: a resume must build the same network and process, with the same
# labels, null class, timestep sampler and EMA rates. Everything else (steps, intervals,
# devices, loggers, workers, ...) may change when a run is resumed.
RESUME_MUST_MATCH = ("model", "diffusion", "class_cond", "data._target_", "data.image_size",
                     "module.label_dropout", "module.schedule_sampler", "callbacks.ema.decays",
                     "callbacks.posthoc_ema.stds")
# Keys of the model config that say how to run the UNet, not what it is.
RUN_TIME_MODEL_KEYS = (*RUNTIME_KEYS, "use_checkpoint")
RESUME_FIX = ("resume with the checkpoint's values (its run folder's config.yaml has them), or start a new "
              "run in another folder (hydra.run.dir=...)")


@dataclass
class Prepared:
    """What `prepare` found: the dataset, split; the checkpoint to resume from, if any."""

    data: ImageData
    resume_path: str | None = None
    resume: dict[str, Any] | None = None  # its tensors memory-mapped


def prepare(cfg: DictConfig) -> Prepared:
    """Check the config, the checkpoint to resume from and the dataset (see the module doc);
    raise a `UserError` naming the key, value or file at the first problem."""
    check_train_config(cfg)
    resume_path = find_resume_checkpoint(cfg)
    resume = read_resume_checkpoint(resume_path) if resume_path else None
    with config_errors("data"):
        data: ImageData = hydra.utils.instantiate(cfg.data)
    if resume is not None:
        plain = OmegaConf.to_container(cfg, resolve=True)
        check_resume_config(resume, resume_path, plain, data.image_size)
    if cfg.get("seed") is not None:
        torch.manual_seed(cfg.seed)  # the training order's seed, read by setup (run.train seeds the rest)
    with config_errors("data", ValueError, RuntimeError):
        data.setup("fit")
    if cfg.class_cond and data.num_classes is None:
        raise ConfigError(f"class_cond=true, but the dataset {cfg.data._target_} has no labels; use "
                          "class_cond=false or a labelled dataset (image_folder: sub-folders or name prefixes)")
    check_posthoc_ema_folder(cfg, resume)  # last: it may move orphaned snapshots aside
    return Prepared(data, resume_path, resume)


# ------------------------------------------------------------------------- the checkpoint
def checkpoint_folder(cfg: Any) -> str:
    """Where the run's checkpoints go (`ModelCheckpoint`'s folder, or the run folder)."""
    callback = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    return str(callback.get("dirpath") or os.path.join(str(cfg.output_dir), "checkpoints"))


def check_posthoc_ema_folder(cfg: Any, resume: dict[str, Any] | None) -> None:
    """With ``callbacks.posthoc_ema``, the run owns the snapshots of its ``phema/`` folder: a
    new run finds none there, a resumed one only its own (`CheckpointError` otherwise). A
    requeued job that found nothing to resume (``ckpt_path=last_or_new``) was killed before
    its first checkpoint: its snapshots can never be continued, and are moved aside."""
    node = (cfg.get("callbacks") or {}).get("posthoc_ema") or {}
    if "_target_" not in node:
        return
    folder = str(node.get("dirpath") or os.path.join(checkpoint_folder(cfg), PHEMA_DIR))
    if resume is None and cfg.get("ckpt_path") == "last_or_new":
        aside = set_snapshots_aside(folder)
        if aside:
            log.warning("ckpt_path=last_or_new starts a new run: the post-hoc EMA snapshots of the run "
                        "killed before its first checkpoint are moved to %s", aside)
        return
    check_snapshot_folder(folder, ((resume or {}).get(PHEMA_KEY) or {}).get("run_id"))


def find_resume_checkpoint(cfg: Any) -> str | None:
    """The file that ``ckpt_path`` names, or None for a new run; `UserError` naming the
    folder or file searched. ``last``: the newest ``last*.ckpt`` of the run's checkpoint
    folder, which must exist (a typo in hydra.run.dir must not start a new run);
    ``last_or_new``: the same, or a new run when there is none (a scheduler's requeued job
    repeats the first start's command line)."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return None
    if ckpt_path in ("last", "last_or_new"):
        folder = checkpoint_folder(cfg)
        found = sorted(glob.glob(os.path.join(glob.escape(folder), "last*.ckpt")), key=os.path.getmtime)
        if found or ckpt_path == "last_or_new":
            return found[-1] if found else None
        raise UserError(
            f"ckpt_path=last, but there is no last*.ckpt in {folder}: is hydra.run.dir the folder of the "
            "run to resume? (leave out ckpt_path to start a new run; ckpt_path=last_or_new starts one "
            "when there is nothing to resume)"
        )
    if not os.path.isfile(ckpt_path):
        raise UserError(f"ckpt_path={ckpt_path}: no such file (ckpt_path=last resumes the run in "
                        "hydra.run.dir; leave ckpt_path out to start a new run)")
    return str(ckpt_path)


def read_resume_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at ``path``, its tensors memory-mapped (opened without reading the
    weights); `CheckpointError` naming the file when it cannot be read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        others = sorted(set(glob.glob(os.path.join(glob.escape(os.path.dirname(path)), "*.ckpt"))) - {path})
        hint = (f"resume from another one with ckpt_path=<file> ({', '.join(map(os.path.basename, others))})"
                if others else "no other checkpoint is in its folder: start a new run")
        raise CheckpointError(f"cannot read checkpoint {path} (damaged or truncated: {reason}); {hint}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a checkpoint written by train.py (it holds no state_dict)")
    return checkpoint


# ------------------------------------------------------------------------- does it match
def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}.{key}"))
        return flat
    return {prefix: list(tree) if isinstance(tree, tuple) else tree}


def identity(config: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    """The `RESUME_MUST_MATCH` entries of a plain run config as dotted keys, with the UNet's
    channel_mult and attention_resolutions as the UNet resolves a null for ``image_size``."""
    model = {k: v for k, v in (config.get("model") or {}).items() if k not in RUN_TIME_MODEL_KEYS}
    if image_size is not None and model:
        try:
            mult, attention = effective_levels(image_size, model.get("channel_mult"),
                                               model.get("attention_resolutions"))
            model["channel_mult"], model["attention_resolutions"] = list(mult), list(attention)
        except ValueError:
            pass  # left as written: the UNet reports the problem
    config = {**config, "model": model}
    flat: dict[str, Any] = {}
    for key in RESUME_MUST_MATCH:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        flat.update(_flatten(node, key))
    return flat


def check_resume_config(checkpoint: dict[str, Any], path: str, config: dict[str, Any], image_size: int) -> None:
    """`UserError` naming each key of `RESUME_MUST_MATCH` where ``config`` (a plain run
    config) differs from the one the checkpoint was trained with."""
    try:
        saved_config, hparams = run_config(checkpoint, path)
    except CheckpointError:
        return  # no run config to compare: the weights are compared once the model is built
    saved, now = identity(saved_config, hparams.get("image_size")), identity(config, image_size)
    differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if differ:
        shown = ", ".join(f"{k}={show(now.get(k))} (checkpoint: {show(saved.get(k))})" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise UserError(f"cannot resume from {path}: the config differs from the checkpoint's in "
                        f"{shown}{more}; {RESUME_FIX}")


def check_resume_weights(checkpoint: dict[str, Any], path: str, module: torch.nn.Module) -> None:
    """`UserError` unless every weight of the checkpoint has the name and shape that
    ``module`` (built from the config) expects."""
    weights = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if torch.is_tensor(v)}
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    differ = [k for k in sorted(set(weights) | set(expected)) if weights.get(k) != expected.get(k)]
    if differ:
        shown = ", ".join(f"{k} {weights.get(k, 'absent')} vs {expected.get(k, 'absent')} now" for k in differ[:3])
        raise UserError(f"cannot resume from {path}: its weights do not fit the model this config builds "
                        f"({len(differ)} tensors differ: {shown}); {RESUME_FIX}")
