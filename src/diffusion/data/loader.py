"""The training loader whose position in the data order survives a checkpoint.

`ResumableDataLoader` draws epoch e's order from its own generator seeded with (seed, e),
counts the batches it has handed out, and implements ``state_dict``/``load_state_dict``,
which Lightning saves with the fit loop and restores, so that a resumed run sees the same
batches as the uninterrupted one (see `diffusion.training.resume` for the random state).
`ShardedBatches` splits the validation and test batches across processes, each image once.
Plain torch: nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


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


class ShardedBatches(Sampler[list[int]]):
    """The evaluation order, split across processes without repeating an image.

    The batches are those of a single process, consecutive ``batch_size`` indices (the last
    one shorter), and global batch i goes to rank i % world_size. Every image is evaluated
    exactly once: DistributedSampler would pad the split by repeating images, biasing a
    mean over it. And each batch is the one a single process sees, so a quantity drawn per
    batch from a seed (`global_batch_index`) comes out the same on any number of processes.
    """

    def __init__(self, num_samples: int, batch_size: int):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_batches = -(-num_samples // batch_size)  # ceil

    def __len__(self) -> int:
        world, rank = _replicas()
        return len(range(rank, self.num_batches, world))

    def __iter__(self) -> Iterator[list[int]]:
        world, rank = _replicas()
        if self.num_batches < world:  # a rank without a batch would wait forever for the others
            raise ValueError(f"{self.num_samples} images in batches of {self.batch_size} make "
                             f"{self.num_batches} batches, fewer than the {world} processes: "
                             "use a smaller batch_size or fewer processes")
        for i in range(rank, self.num_batches, world):
            yield list(range(i * self.batch_size, min((i + 1) * self.batch_size, self.num_samples)))


def global_batch_index(batch_idx: int) -> int:
    """The index among all processes' batches of this process's ``batch_idx``-th evaluation
    batch (`ShardedBatches`): what a single process would call it."""
    world, rank = _replicas()
    return batch_idx * world + rank
