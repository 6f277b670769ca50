"""`PostHocEMA`: power-function EMA profiles kept during training, with snapshots from which
sample.py and evaluate.py rebuild the EMA of any width afterwards (``ema_std=0.05``).

EDM2 (Karras et al. 2024, arXiv 2312.02696, sec. 3 and App. C): instead of choosing the EMA
length before training, track two power-function averages (σ_rel = 0.05 and 0.10: γ = 16.97
and 6.94) and save both every ``snapshot_every`` steps; the least-squares combination of the
snapshots approximates the average of any other σ_rel at the last snapshot's step
(`diffusion.process.posthoc_ema`, whose notation this follows; `diffusion.checkpoint.load_posthoc_ema`).

Like `diffusion.training.ema.EMA`, the averages move once per optimizer step with one foreach
lerp per profile, ``θ̂ <- θ̂ + (1 - β_t)(θ - θ̂)`` with β_t = (1 - 1/t)^(γ+1), and live in the
callback state of each checkpoint, so ``trainer.fit(ckpt_path=...)`` resumes them exactly. A
step that the non-finite guard skipped is folded in like any other: the weights did not move,
so θ_t = θ_{t-1}, and the profile stays a function of the optimizer step t = global_step.

Snapshots go to ``<checkpoint folder>/phema/phema-<step>.pt`` (both profiles in one file,
written atomically, named by the step alone), each holding the run's id, which is kept in the
checkpoints too: a resumed run writes exactly the files the uninterrupted run would and keeps
those written before; a folder holding another run's snapshots is an error, never overwritten.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from diffusion.checkpoint import PHEMA_DIR, PHEMA_KEY, check_snapshot_folder, save_snapshot
from diffusion.process.posthoc_ema import check_stds, gamma_from_std, power_beta
from diffusion.training.ema import _copy_, _names, _tensors, submodule
from diffusion.utils.checks import require_int

log = logging.getLogger(__name__)


class PostHocEMA(L.Callback):
    """Tracks one power-function EMA of ``pl_module.<attribute>`` per σ_rel in ``stds`` and
    saves all of them every ``snapshot_every`` optimizer steps (see the module doc).

    Args:
        stds: the σ_rel of each tracked profile (EDM2 keeps 0.05 and 0.10).
        snapshot_every: optimizer steps between snapshots (at steps k, 2k, ...); a run whose
            last step is not a multiple ends without a snapshot of it.
        attribute: the sub-module to average, a (dotted) attribute of the LightningModule.
        dirpath: the snapshots' folder; default ``<the ModelCheckpoint folder>/phema``.
    """

    def __init__(self, stds: Sequence[float] = (0.05, 0.10), snapshot_every: int = 10000,
                 attribute: str = "model", dirpath: str | None = None) -> None:
        super().__init__()
        self.stds = check_stds(stds)
        self.gammas = tuple(gamma_from_std(std) for std in self.stds)
        require_int("snapshot_every", snapshot_every, 1)
        if not isinstance(attribute, str) or not attribute:
            raise ValueError(f"attribute={attribute!r} must name a sub-module, e.g. 'model'")
        self.snapshot_every = snapshot_every
        self.attribute = attribute
        self.dirpath = dirpath
        self.run_id = uuid.uuid4().hex  # a resume takes the checkpoint's
        self.step = 0  # t: optimizer steps folded into the averages
        self.averages: dict[float, list[torch.Tensor]] = {}  # σ_rel -> the module's tensors, averaged
        self._names: list[str] = []  # their state-dict names (`ema._names` order)
        self._saved: set[str] = set()  # the names a snapshot keeps: the module's state-dict keys
        self._pending: dict[str, Any] | None = None  # loaded before the averages existed

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attribute=self.attribute)

    def folder(self, trainer: L.Trainer) -> str:
        """Where the snapshots go: ``dirpath``, else ``phema/`` in the checkpoint folder."""
        if self.dirpath:
            return str(self.dirpath)
        callback = trainer.checkpoint_callback
        checkpoints = getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(checkpoints, PHEMA_DIR)

    # ---------------------------------------------------------------- create / update
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = submodule(pl_module, self.attribute, type(self).__name__)
        if not self.averages:  # the current weights, which the first update replaces (β_1 = 0)
            self.averages = {std: [t.clone() for t in _tensors(module)] for std in self.stds}
            self._names = _names(module)
            self._saved = set(module.state_dict())
        else:  # a second fit with the same callback: follow the module's device
            device = next(iter(_tensors(module)), torch.empty(0)).device
            self.averages = {std: [t.to(device) for t in tensors] for std, tensors in self.averages.items()}
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._apply_state(state)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The checkpoint (run id, step) is restored by now, whatever the strategy.
        if trainer.global_step != self.step:
            raise ValueError(
                f"PostHocEMA: the run is at step {trainer.global_step} but its averages hold {self.step} "
                "steps (was the checkpoint written without callbacks.posthoc_ema?); a power-function EMA "
                "must start with the run: start a new run, or resume without callbacks.posthoc_ema"
            )
        if not trainer.is_global_zero:
            return
        folder = self.folder(trainer)
        later = [s for s in check_snapshot_folder(folder, self.run_id) if s > self.step]
        if later:
            log.info("post-hoc EMA: %d snapshot(s) of this run after step %d in %s are written again "
                     "as the run passes their steps", len(later), self.step, folder)
        max_steps = getattr(trainer, "max_steps", -1)
        if 0 < max_steps < self.snapshot_every:  # e.g. a short test run of a preset
            log.warning("post-hoc EMA: snapshot_every=%d is more than max_steps=%d: this run keeps no "
                        "snapshot (set callbacks.posthoc_ema.snapshot_every to a divisor of the run)",
                        self.snapshot_every, max_steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step <= self.step:  # accumulating gradients: no optimizer step yet
            return
        self.step = trainer.global_step
        self.update(submodule(pl_module, self.attribute, type(self).__name__))
        if self.step % self.snapshot_every == 0 and trainer.is_global_zero:
            save_snapshot(self.folder(trainer), self.step, self.run_id, self.profiles())

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the weights after optimizer step ``self.step`` into every profile."""
        current = _tensors(module)
        floats = [i for i, t in enumerate(current) if t.is_floating_point()]
        others = [i for i, t in enumerate(current) if not t.is_floating_point()]
        for gamma, averaged in zip(self.gammas, self.averages.values(), strict=True):
            rate = 1.0 - power_beta(self.step, gamma)  # a host float: no device sync
            torch._foreach_lerp_([averaged[i] for i in floats], [current[i] for i in floats], rate)
            if others:  # integer buffers (counters) follow the module
                _copy_([averaged[i] for i in others], [current[i] for i in others])

    def profiles(self) -> list[dict[str, Any]]:
        """The averages as a snapshot holds them: σ_rel, γ and the sub-module's state dict (CPU)."""
        return [{"std": std, "gamma": gamma,
                 "state_dict": {name: t.detach().cpu() for name, t in zip(self._names, tensors, strict=True)
                                if name in self._saved}}
                for std, gamma, tensors in zip(self.stds, self.gammas, self.averages.values(), strict=True)]

    # -------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        if not self.averages and self._pending is not None:  # loaded, never materialised
            return dict(self._pending)
        return {
            "stds": list(self.stds), "gammas": list(self.gammas), "run_id": self.run_id, "step": self.step,
            "averages": {str(std): dict(zip(self._names, tensors, strict=True))
                         for std, tensors in self.averages.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called before ``on_fit_start`` on a resume: the state waits for the averages."""
        saved = [float(s) for s in state_dict.get("stds", [])]
        if saved != list(self.stds):
            raise ValueError(f"PostHocEMA: the checkpoint tracks stds={saved}, this run stds={list(self.stds)}; "
                             f"resume with callbacks.posthoc_ema.stds={saved}")
        self.run_id, self.step = state_dict["run_id"], int(state_dict["step"])
        if self.averages:
            self._apply_state(state_dict)
        else:
            self._pending = state_dict

    def _apply_state(self, state: dict[str, Any]) -> None:
        for std, tensors in self.averages.items():
            saved = state["averages"][str(std)]
            _copy_(tensors, [saved[name] for name in self._names])

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # For readers that do not build the callback: whose snapshots belong to this checkpoint.
        checkpoint[PHEMA_KEY] = {"run_id": self.run_id, "stds": list(self.stds), "gammas": list(self.gammas),
                                 "snapshot_every": self.snapshot_every, "step": self.step}
