"""Precision/recall, KID and the memorisation audit (`diffusion.evaluation.neighbours`) on
hand-made feature sets whose answers are computed by hand or by a plain double loop."""

from __future__ import annotations

import pytest
import torch

from diffusion.evaluation.neighbours import (
    kernel_inception_distance,
    knn_radii,
    memorisation_audit,
    precision_recall,
)


def on_a_line(*xs: float) -> torch.Tensor:
    """Points (x, 0) in the plane, float64: (N,) -> (N, 2)."""
    x = torch.tensor(xs, dtype=torch.float64)
    return torch.stack([x, torch.zeros_like(x)], dim=1)


def blob(n: int, centre: tuple[float, float], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=generator, dtype=torch.float64) + torch.tensor(centre, dtype=torch.float64)


def test_knn_radius_is_the_kth_neighbour_without_itself():
    points = on_a_line(0, 1, 3, 6)
    torch.testing.assert_close(knn_radii(points, k=1), on_a_line(1, 1, 2, 3)[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(knn_radii(points, k=2), on_a_line(3, 2, 3, 5)[:, 0], rtol=0, atol=1e-12)


def test_precision_counts_samples_inside_some_real_ball():
    real = on_a_line(0, 1, 3, 6)  # k = 1 radii 1, 1, 2, 3
    fake = on_a_line(4.5, 10, 20)  # 4.5 is within 2 of 3; 10 and 20 are outside every ball
    # fake radii (k = 1): 5.5, 5.5, 10: real 0 is 4.5 from 4.5 (inside), 1, 3, 6 too
    assert precision_recall(real, fake, k=1) == {"precision": pytest.approx(1 / 3), "recall": 1.0}


def test_identical_sets_have_precision_and_recall_one():
    points = blob(60, (0, 0), seed=0)
    assert precision_recall(points, points.clone(), k=3) == {"precision": 1.0, "recall": 1.0}


def test_far_apart_clusters_have_precision_and_recall_zero():
    assert precision_recall(blob(50, (0, 0), 0), blob(50, (1000, 0), 1), k=3) == {"precision": 0.0, "recall": 0.0}


def test_covering_half_the_real_modes_gives_recall_one_half():
    mode_a, mode_b = blob(40, (0, 0), 0), blob(40, (1000, 0), 1)
    result = precision_recall(torch.cat([mode_a, mode_b]), mode_a.clone(), k=3)
    assert result == {"precision": 1.0, "recall": 0.5}


def test_k_must_be_smaller_than_each_set():
    with pytest.raises(ValueError, match="k=3 needs at least k \\+ 1 = 4 generated features, got 3"):
        precision_recall(blob(10, (0, 0), 0), blob(3, (0, 0), 1), k=3)


def mmd2_unbiased_double_loop(x: torch.Tensor, y: torch.Tensor) -> float:
    """Bińkowski et al. 2018 eq. 3 with k(a, b) = (aᵀb / d + 1)³, one term at a time."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    x, y = blob(12, (0, 0), 0), blob(12, (0.5, 1), 1)
    # one subset of every feature: the permutation does not change the estimate
    result = kernel_inception_distance(x, y, subsets=1, subset_size=100)
    assert result["kid_subset_size"] == 12 and result["kid_std"] == 0
    torch.testing.assert_close(result["kid"], mmd2_unbiased_double_loop(x, y), rtol=1e-10, atol=1e-12)


def test_kid_of_one_distribution_is_near_zero_and_repeats_with_the_seed():
    x, y, shifted = blob(200, (0, 0), 0), blob(200, (0, 0), 1), blob(200, (2, 0), 2)
    same = kernel_inception_distance(x, y, subsets=20, subset_size=50, seed=3)
    assert abs(same["kid"]) < 3 * same["kid_std"] + 1e-3
    assert kernel_inception_distance(x, shifted, subsets=20, subset_size=50)["kid"] > 50 * abs(same["kid"])
    assert kernel_inception_distance(x, y, subsets=20, subset_size=50, seed=3) == same


def test_memorisation_share_is_the_share_of_copies():
    train = blob(50, (0, 0), 0)
    copies = train[[3, 17, 41]]
    novel = blob(9, (100, 100), 1)  # far from every training feature: ratios far above 1
    audit = memorisation_audit(torch.cat([novel[:4], copies, novel[4:]]), train, threshold=1 / 3)
    assert audit.share == pytest.approx(3 / 12)
    assert sorted(j for _, j, _ in audit.closest(3)) == [3, 17, 41]
    assert {i for i, _, _ in audit.closest(3)} == {4, 5, 6} and audit.closest(3)[0][2] < 1e-6


def test_memorisation_ratio_by_hand():
    train = on_a_line(0, 1, 3)  # nearest-neighbour distances within the set: 1, 1, 2
    audit = memorisation_audit(on_a_line(3.5, 0.5, -0.1), train, threshold=0.3)
    # 3.5 -> 3: 0.5 / 2; 0.5 -> 0 or 1 (a tie): 0.5 / 1; -0.1 -> 0: 0.1 / 1
    torch.testing.assert_close(audit.ratio, torch.tensor([0.25, 0.5, 0.1], dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert audit.share == pytest.approx(2 / 3)


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5])
def test_memorisation_threshold_outside_zero_one(threshold):
    with pytest.raises(ValueError, match=f"threshold={threshold} must be in \\(0, 1\\]"):
        memorisation_audit(blob(5, (0, 0), 0), blob(5, (0, 0), 1), threshold=threshold)
