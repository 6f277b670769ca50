"""Metrics of samples beyond FID/IS, on the features that FID extracts: precision and recall,
KID, and a nearest-neighbour memorisation audit. Nothing here prints or writes.

* Improved precision and recall (Kynkäänniemi et al. 2019, arXiv 1904.06991, sec. 2, eqs.
  1-2): each feature φ of a set Φ gets the radius of its ball, the distance to its k-th nearest
  neighbour in Φ (itself excluded); f(φ, Φ) = 1 when φ lies in some ball of Φ. Precision =
  mean over generated φ_g of f(φ_g, Φ_r), recall = mean over real φ_r of f(φ_r, Φ_g). Exact
  (every pairwise distance, in batches), k = 3 as in the paper.
* KID (Bińkowski et al. 2018, arXiv 1801.01401, sec. 3): the unbiased MMD² with the kernel
  k(x, y) = (xᵀy / d + 1)³, averaged over random subsets: torchmetrics'
  ``KernelInceptionDistance``, handed the features.
* Memorisation audit: for a sample s with nearest training feature t, the ratio
  ‖s − t‖ / ‖t − NN(t)‖ (NN within the training set). Near-copies have ratios far below 1; the
  share below ``threshold`` (1/3 in the literature on near-copies, e.g. Meehan et al. 2020,
  arXiv 2004.05675, and Carlini et al. 2023, arXiv 2301.13188) is reported.

Distances are Euclidean, computed ``block`` rows at a time (torch.cdist), in the features'
dtype, on the features' device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics.image.kid import KernelInceptionDistance


def _nearest(queries: torch.Tensor, points: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest distances from each query to ``points`` and their indices, ascending:
    (Q, D), (P, D) -> (Q, k), (Q, k)."""
    distances, indices = [], []
    for rows in queries.split(block):
        d = torch.cdist(rows, points).clamp_min(0)  # (b, D), (P, D) -> (b, P)
        values, where = d.topk(k, dim=1, largest=False)  # (b, P) -> 2 x (b, k)
        distances.append(values)
        indices.append(where)
    return torch.cat(distances), torch.cat(indices)


def _check_set(name: str, features: torch.Tensor, k: int) -> None:
    if features.ndim != 2:
        raise ValueError(f"{name} features must be (N, D), got shape {tuple(features.shape)}")
    if not 1 <= k < len(features):
        raise ValueError(f"k={k} needs at least k + 1 = {k + 1} {name} features, got {len(features)}")


def knn_radii(features: torch.Tensor, k: int = 3, block: int = 1024) -> torch.Tensor:
    """(N, D) -> (N,): the distance of each feature to its k-th nearest neighbour in the set,
    itself excluded (the (k+1)-th smallest distance, the first being its own 0)."""
    _check_set("the", features, k)
    distances, _ = _nearest(features, features, k + 1, block)  # (N, k + 1), ascending
    return distances[:, k]


def share_inside_balls(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                       block: int = 1024) -> float:
    """The share of ``queries`` inside at least one ball ‖q − c_i‖ ≤ r_i (Kynkäänniemi eq. 1)."""
    inside = [(torch.cdist(rows, centres) <= radii).any(dim=1) for rows in queries.split(block)]  # (b, P) -> (b,)
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, block: int = 1024) -> dict[str, float]:
    """Improved precision and recall of ``fake`` (N_g, D) against ``real`` (N_r, D) features."""
    _check_set("real", real, k)
    _check_set("generated", fake, k)
    precision = share_inside_balls(fake, real, knn_radii(real, k, block), block)
    recall = share_inside_balls(real, fake, knn_radii(fake, k, block), block)
    return {"precision": precision, "recall": recall}


class _Given(nn.Module):
    """Feature 'network' for the torchmetrics metrics: features are computed upstream."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """KID of ``fake`` against ``real`` features: torchmetrics' mean and (biased) std over
    ``subsets`` random subsets of ``min(subset_size, N_r, N_g)`` features of each set, drawn
    from a generator seeded with ``seed``."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated features, got {len(real)} and {len(fake)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # compute() draws its subsets with the global RNG
        mean, std = metric.compute()
    return {"kid": float(mean), "kid_std": float(std), "kid_subset_size": size}


@dataclass
class MemorisationAudit:
    """Per sample: ``ratio`` ‖s − t‖ / ‖t − NN(t)‖ and ``nearest``, the index of t in the
    training features; ``share`` of ratios below ``threshold``."""

    ratio: torch.Tensor
    nearest: torch.Tensor
    threshold: float
    share: float

    def closest(self, count: int) -> list[tuple[int, int, float]]:
        """The ``count`` (sample index, training index, ratio) with the smallest ratios."""
        order = self.ratio.argsort()[:count].tolist()
        return [(i, int(self.nearest[i]), float(self.ratio[i])) for i in order]


def memorisation_audit(samples: torch.Tensor, train: torch.Tensor, threshold: float = 1 / 3,
                       block: int = 1024) -> MemorisationAudit:
    """Nearest-neighbour ratios of ``samples`` (N, D) against ``train`` (M, D) features."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold} must be in (0, 1]")
    _check_set("training", train, 1)
    distance, nearest = _nearest(samples, train, 1, block)  # 2 x (N, 1)
    distance, nearest = distance[:, 0], nearest[:, 0]  # (N, 1) -> (N,)
    own = knn_radii(train, 1, block)[nearest]  # (M,) -> (N,): NN distance of t within the training set
    # A training image with a duplicate has own = 0: a copy of it has ratio 0, anything else inf.
    ratio = torch.where(distance == 0, torch.zeros_like(distance), distance / own)
    share = float((ratio < threshold).double().mean())
    return MemorisationAudit(ratio=ratio, nearest=nearest, threshold=threshold, share=share)
