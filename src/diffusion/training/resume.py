"""Exact resume: a training loader that restarts mid-epoch, and the random-number state.

Lightning restores the model, optimizer, schedulers, callbacks and loop counters from a
checkpoint. Two more things decide what a resumed run computes next:

- the position in the data order. `ResumableDataLoader` draws epoch e's order from its own
  generator seeded with (seed, e), counts the batches it has handed out, and implements
  ``state_dict``/``load_state_dict``, which Lightning saves with the fit loop and restores;
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
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger(__name__)


def _replicas() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class EpochPermutation(Sampler[int]):
    """A random permutation per epoch from a generator seeded with (seed, epoch), started
    ``start`` samples in; the order never depends on the global random state.

    Under torch.distributed each rank takes every world_size-th index of the same
    permutation (as DistributedSampler does), so Lightning's own sampler replacement is
    switched off (``trainer.use_distributed_sampler: false``).
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        # The whole epoch, also while resuming mid-epoch: Lightning counts the batches of an
        # epoch from its restored progress, against this length.
        world, _ = _replicas()
        return self.num_samples // world

    def __iter__(self) -> Iterator[int]:
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(seed))
        world, rank = _replicas()
        order = order[: len(order) - len(order) % world][rank::world]  # (N,) -> (N // world,)
        return iter(order[self.start:].tolist())


class ResumableDataLoader(DataLoader):
    """A shuffling, ``drop_last`` training loader whose position survives a checkpoint.

    The state counts the batches handed out in the current epoch. Lightning fetches one
    batch ahead of the step it trains, so the count at a checkpoint includes that batch;
    `state_dict` subtracts the batches fetched but not yet trained (``in_flight``), which
    the `RandomState` callback keeps up to date from the loop's progress counters.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, **kwargs: Any):
        self.order = EpochPermutation(len(dataset), seed)
        super().__init__(dataset, batch_size=batch_size, sampler=self.order, drop_last=True,
                         generator=torch.Generator().manual_seed(seed), **kwargs)
        self.epoch, self.fetched, self.trained = 0, 0, 0

    def __iter__(self):
        self.order.epoch, self.order.start = self.epoch, self.fetched * self.batch_size
        for batch in super().__iter__():
            self.fetched += 1
            yield batch
        self.epoch, self.fetched, self.trained = self.epoch + 1, 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.trained}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.fetched, self.trained = int(state["epoch"]), int(state["batches"]), int(state["batches"])


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
