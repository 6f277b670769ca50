"""`WeightedMean`: a weighted running mean that never reads the device while updating."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class WeightedMean(Metric):
    """Σ w·x / Σ w over every update, reduced across processes by summing both parts.

    torchmetrics' `MeanMetric` either looks for NaNs on every update (``value.any()``: a
    host-device synchronisation per training step) or, with ``nan_strategy="disable"``,
    drops the weights. Callers mask non-finite values with zero weight instead.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("weighted_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: torch.Tensor) -> None:
        value, weight = torch.broadcast_tensors(value.detach(), weight.detach())
        self.weighted_sum += (value.double() * weight.double()).sum()
        self.weight += weight.double().sum()

    def compute(self) -> torch.Tensor:
        # 0/0 = NaN when no value had weight (e.g. no t in this quarter yet)
        return (self.weighted_sum / self.weight).float()
