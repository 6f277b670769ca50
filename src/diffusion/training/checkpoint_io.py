"""Checkpoint writes that never corrupt or replace a good checkpoint with a bad one.

The checkpoint is written by `diffusion.checkpoint.save_checkpoint` (a temporary file beside
the target, flushed, fsynced and renamed over it): a crash or a full disk during the write
leaves the previous file intact. A model whose weights are no longer finite is refused before
anything is written, so a NaN never replaces the last good checkpoint.

Lightning saves a step's checkpoint in ``on_train_batch_end``, before that step's metrics reach
the loggers. A process killed between the two would resume after a step whose row is never
written. `CheckpointAfterLogs` therefore has the checkpoints asked for in ``on_train_batch_end``
held (a CPU copy, so that later in-place changes such as the EMA swap for validation do not
reach it) and written once the step is logged: at the next batch's start, the start of
validation, or the checkpoint IO's teardown (the end of fit, also after an exception), whichever
comes first. A kill in
between loses only the held checkpoint; the resumed run starts from the previous one and
computes (and logs) the steps after it again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from diffusion.checkpoint import save_checkpoint


class NonFiniteModelError(RuntimeError):
    """The weights to be saved hold NaN or inf."""


def nonfinite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors with a NaN or inf (one fused check per tensor)."""
    return [name for name, value in state_dict.items()
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` with atomic, finiteness-checked writes, which can be held until the
    step they follow is logged (`hold`, `release`; see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self._held: list[Callable[[], None]] | None = None  # None: write at once
        # The CPU copy of each tensor held, by identity: ModelCheckpoint dumps the same weights
        # twice a step (stepN.ckpt and last.ckpt), which then take host memory once. The source
        # is kept with its copy so that its address cannot be reused by another tensor meanwhile.
        self._copies: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def hold(self) -> None:
        """Queue the saves and removals that follow, in order, until `release`."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Carry out the queued saves and removals, in order, and stop holding."""
        held, self._held, self._copies = self._held or [], None, {}
        for operation in held:
            operation()

    def teardown(self) -> None:
        self.release()
        super().teardown()

    def _cpu_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key not in self._copies:
            self._copies[key] = (tensor, tensor.detach().to("cpu", copy=True))
        return self._copies[key][1]

    def remove_checkpoint(self, path) -> None:
        if self._held is not None:
            self._held.append(partial(super().remove_checkpoint, path))
        else:
            super().remove_checkpoint(path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = str(path)
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            previous = f"the previous {path} is intact" if os.path.exists(path) else "nothing was written"
            raise NonFiniteModelError(
                f"refusing to write checkpoint {path} at step {checkpoint.get('global_step')}: "
                f"{len(bad)} weight tensor(s) are not finite ({', '.join(bad[:3])}); {previous}"
            )
        if self._held is not None:
            copy = apply_to_collection(checkpoint, torch.Tensor, self._cpu_copy)
            self._held.append(partial(save_checkpoint, copy, path))
        else:
            save_checkpoint(checkpoint, path)


class CheckpointAfterLogs(L.Callback):
    """Holds the checkpoints Lightning saves in ``on_train_batch_end`` until the step's metrics
    are logged (see module doc). Needs `AtomicCheckpointIO` as the trainer's checkpoint IO
    (configs/trainer/default.yaml); does nothing with another."""

    @staticmethod
    def _io(trainer: L.Trainer) -> AtomicCheckpointIO | None:
        io = trainer.strategy.checkpoint_io
        return io if isinstance(io, AtomicCheckpointIO) else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Runs before ModelCheckpoint's: Lightning moves checkpoint callbacks last.
        if io := self._io(trainer):
            io.hold()

    def _release(self, trainer: L.Trainer, *args: Any) -> None:
        if io := self._io(trainer):
            io.release()

    # The end of fit and exceptions need no hook: Lightning's teardown releases (`AtomicCheckpointIO.teardown`).
    on_train_batch_start = on_validation_start = _release
