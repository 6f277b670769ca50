"""Exact resume: the random-number state, and a checkpoint when the job is told to stop.

Lightning restores the model, optimizer, schedulers, callbacks and loop counters from a
checkpoint. Two more things decide what a resumed run computes next:

- the position in the data order: `diffusion.data.loader.ResumableDataLoader`, whose state
  Lightning saves with the fit loop and restores;
- the global random state (t, noise and dropout of the next steps). `RandomState` is a
  callback that stores the torch (CPU and CUDA), numpy and Python states in the
  checkpoint and puts them back right before the first resumed step.

With both, a run killed after a checkpoint and resumed from it repeats the uninterrupted
run's losses exactly on a CPU (with deterministic kernels on a GPU).
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion.data.loader import ResumableDataLoader

log = logging.getLogger(__name__)


class RandomState(L.Callback):
    """Saves the global random state in checkpoints and restores it for the first resumed
    step; keeps `ResumableDataLoader` counting trained (not merely fetched) batches."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loader = getattr(trainer, "train_dataloader", None)
        if isinstance(loader, ResumableDataLoader):
            loader.trained = batch_idx + 1

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # Plain tensors and numbers, so that weights_only checkpoint loading accepts them.
        numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}
        state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def on_train_start(self, trainer, pl_module) -> None:
        # Applied here, after Lightning's set-up, so nothing between this and the first
        # resumed step draws from the global generators.
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointOnSignal(L.Callback):
    """Saves ``last.ckpt`` when the job is told to stop (SIGTERM: pre-emption, ``scancel``,
    a scheduler's time limit), at the end of the batch in progress, so the restarted job
    (``ckpt_path=last``) loses no finished step. Under SLURM with auto-requeue, Lightning
    itself handles SIGUSR1 (checkpoint, then requeue)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        folder = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else trainer.default_root_dir
        path = os.path.join(folder, "last.ckpt")
        trainer.save_checkpoint(path)
        log.warning("stopped by SIGTERM at step %d; saved %s", trainer.global_step, path)
