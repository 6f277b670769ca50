"""Checkpoint writes that never corrupt or replace a good checkpoint with a bad one.

The checkpoint is written by `diffusion.checkpoint.save_checkpoint` (a temporary file beside
the target, flushed, fsynced and renamed over it): a crash or a full disk during the write
leaves the previous file intact. A model whose weights are no longer finite is refused before
anything is written, so a NaN never replaces the last good checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from diffusion.checkpoint import save_checkpoint


class NonFiniteModelError(RuntimeError):
    """The weights to be saved hold NaN or inf."""


def nonfinite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors with a NaN or inf (one fused check per tensor)."""
    return [name for name, value in state_dict.items()
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` with atomic, finiteness-checked writes (see module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = str(path)
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            previous = f"the previous {path} is intact" if os.path.exists(path) else "nothing was written"
            raise NonFiniteModelError(
                f"refusing to write checkpoint {path} at step {checkpoint.get('global_step')}: "
                f"{len(bad)} weight tensor(s) are not finite ({', '.join(bad[:3])}); {previous}"
            )
        save_checkpoint(checkpoint, path)
