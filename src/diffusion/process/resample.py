"""Timestep samplers: importance sampling of t for the training objective (IDDPM sec. 3.3).

A sampler draws t with probability p_t and returns the weight w_t = 1/(T p_t), so that
E_t[w_t L_t] = (1/T) Σ_t L_t: the objective's mean is unchanged and only its variance
moves. Conventions follow openai/improved-diffusion's ``resample.py``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist


class ScheduleSampler(ABC):
    """A distribution over the T timesteps of a diffusion process."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive sampling weights, one per timestep, shape (T,)."""

    def probs(self) -> np.ndarray:
        """p_t, the normalised sampling probabilities, float64 (T,)."""
        w = np.asarray(self.weights(), dtype=np.float64)
        return w / w.sum()

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None):
        """Importance-sample timesteps for a batch.

        :param generator: a CPU torch.Generator (the draw happens on the host).
        :return: ``(t, weights)``: int64 (B,) indices and float32 (B,) weights 1/(T p_t).
        """
        p = self.probs()
        probs = torch.from_numpy(p)
        # (T,) probabilities -> (B,) draws, with replacement
        indices = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        weights = torch.from_numpy(1.0 / (len(p) * p[indices.numpy()]))  # (B,)
        return indices.to(device), weights.float().to(device)

    def state_dict(self) -> dict:
        """What a checkpoint needs to restore this sampler exactly (nothing, by default)."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from :meth:`state_dict`."""
        del state_dict  # stateless by default


class UniformSampler(ScheduleSampler):
    """p_t = 1/T, every weight 1: DDPM's L_simple."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps], dtype=np.float64)

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the losses seen in training."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Record this rank's (t, loss) pairs; under torch.distributed, every rank's.

        All ranks then hold identical histories. Batches of unequal size are padded to
        the largest for the all_gather and cut back afterwards (as improved-diffusion).
        """
        local_ts = local_ts.detach().reshape(-1)
        local_losses = local_losses.detach().reshape(-1)
        if not (dist.is_available() and dist.is_initialized()):
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return
        sizes = [
            torch.zeros(1, dtype=torch.int64, device=local_ts.device)
            for _ in range(dist.get_world_size())
        ]
        dist.all_gather(
            sizes, torch.tensor([len(local_ts)], dtype=torch.int64, device=local_ts.device)
        )
        sizes = [int(s.item()) for s in sizes]
        max_bs = max(sizes)
        ts_batches = [
            torch.zeros(max_bs, dtype=local_ts.dtype, device=local_ts.device) for _ in sizes
        ]
        loss_batches = [
            torch.zeros(max_bs, dtype=local_losses.dtype, device=local_losses.device) for _ in sizes
        ]
        pad = max_bs - len(local_ts)
        dist.all_gather(ts_batches, torch.nn.functional.pad(local_ts, (0, pad)))
        dist.all_gather(loss_batches, torch.nn.functional.pad(local_losses, (0, pad)))
        timesteps = [
            t for batch, n in zip(ts_batches, sizes, strict=True) for t in batch[:n].tolist()
        ]
        losses = [
            x for batch, n in zip(loss_batches, sizes, strict=True) for x in batch[:n].tolist()
        ]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        """Update from the (t, loss) pairs of all ranks; deterministic, no communication."""


class LossSecondMomentResampler(LossAwareSampler):
    """p_t ∝ √E[L_t²] (IDDPM sec. 3.3), mixed with uniform_prob of the uniform distribution.

    Keeps the last ``history_per_term`` losses of every t; until every t has that many,
    sampling is uniform (the warm-up).
    """

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        T = self.diffusion.num_timesteps
        if not self._warmed_up():
            return np.ones([T], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        if not weights.sum() > 0:  # all-zero losses: nothing to prefer
            return np.ones([T], dtype=np.float64)
        weights = weights / weights.sum()
        # the uniform floor keeps every p_t > 0, so the weights 1/(T p_t) stay finite
        return weights * (1 - self.uniform_prob) + self.uniform_prob / T

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses, strict=True):
            if not math.isfinite(loss):  # a skipped step's NaN/inf would poison p_t forever
                continue
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                # shift out the oldest loss
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self) -> dict:
        # tensors rather than numpy arrays: torch.load(weights_only=True) accepts them
        return {
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.copy()),
            "history_per_term": self.history_per_term,
            "uniform_prob": self.uniform_prob,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        history = np.asarray(state_dict["loss_history"], dtype=np.float64)
        counts = np.asarray(state_dict["loss_counts"], dtype=np.int64)
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"state has loss_history {history.shape} and loss_counts {counts.shape}, "
                f"expected {self._loss_history.shape} and {self._loss_counts.shape}"
            )
        self._loss_history = history.copy()
        self._loss_counts = counts.copy()
        self.history_per_term = int(state_dict.get("history_per_term", self.history_per_term))
        self.uniform_prob = float(state_dict.get("uniform_prob", self.uniform_prob))


_SAMPLERS = {
    "uniform": UniformSampler,
    "loss-second-moment": LossSecondMomentResampler,
}


def create_named_schedule_sampler(name: str, diffusion) -> ScheduleSampler:
    """A timestep sampler by name: ``"uniform"`` or ``"loss-second-moment"`` (IDDPM sec. 3.3)."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown schedule sampler {name!r}; valid names: {sorted(_SAMPLERS)}")
    return _SAMPLERS[name](diffusion)
