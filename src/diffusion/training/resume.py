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

Before a resume touches anything, `diffusion.training.preflight` finds the checkpoint that
``ckpt_path`` names, reads it, and checks that the config builds the model it holds. A job told to stop (SIGTERM, or Ctrl-C: SIGINT) saves
``last.ckpt`` at the end of the step in progress and ends with `Preempted`, which train.py
reports with the command that resumes it and exit status 128 + the signal number.
"""

from __future__ import annotations

import logging
import os
import random
import shlex
import signal
import threading
from collections.abc import Sequence
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
    a scheduler's time limit; SIGINT: Ctrl-C), at the end of the batch in progress, so the
    restarted job (``ckpt_path=last``) loses no finished step. A second Ctrl-C stops at once,
    without saving. `run.train` then raises `Preempted`. Under SLURM with auto-requeue,
    Lightning itself handles SIGUSR1 (checkpoint, then requeue)."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None  # the signal that stopped the run
        self.saved: str | None = None  # the checkpoint written on it
        self._previous_sigint: Any = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning's SIGTERM handler is in place by now; Ctrl-C is routed to it.
        if threading_main():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous_sigint is not None and threading_main():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _on_sigint(self, signum, frame) -> None:
        sigterm = signal.getsignal(signal.SIGTERM)
        if self.signal is not None or not callable(sigterm):
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal = signal.SIGINT
        log.warning("Ctrl-C: saving last.ckpt at the end of this step (press Ctrl-C again to stop at once)")
        sigterm(signal.SIGTERM, frame)  # Lightning's handler: stop all processes after this step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.signal = self.signal or signal.SIGTERM
        callback = trainer.checkpoint_callback  # without one: where ckpt_path=last looks (preflight)
        folder = callback.dirpath if callback else os.path.join(trainer.default_root_dir, "checkpoints")
        path = os.path.join(folder, "last.ckpt")
        trainer.save_checkpoint(path)
        self.saved = path
        log.warning("stopped by %s at step %d; saved %s", self.signal.name, trainer.global_step, path)


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


class Preempted(Exception):
    """The run was told to stop (`CheckpointOnSignal`) before its last step."""

    def __init__(self, signum: signal.Signals, step: int, max_steps: int, saved: str | None,
                 output_dir: str, report: bool = True) -> None:
        self.signal, self.step, self.max_steps, self.saved = signum, step, max_steps, saved
        self.output_dir, self.report = output_dir, report
        total = f" of {max_steps}" if max_steps and max_steps > 0 else ""
        saved_text = f"saved {saved}" if saved else "no checkpoint was saved (callbacks.checkpoint_on_signal is off)"
        super().__init__(f"stopped by {signum.name} at step {step}{total}; {saved_text}")

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + int(self.signal)


def resume_command(output_dir: str, overrides: Sequence[str], program: str = "python train.py") -> str:
    """The command line that resumes a run: its own overrides, its folder and ``ckpt_path=last``."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "hydra.run.dir")]
    return " ".join([program, *map(shlex.quote, kept), shlex.quote(f"hydra.run.dir={output_dir}"), "ckpt_path=last"])
