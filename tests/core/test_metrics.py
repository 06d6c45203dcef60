import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from consortia.core.metrics import auc_from_histograms, score_histograms


def test_histogram_auc_matches_exact_auc():
    rng = np.random.default_rng(1)
    y = rng.random(5000) < 0.1
    scores = 1 / (1 + np.exp(-(rng.normal(size=5000) + 1.2 * y)))
    neg, pos = score_histograms(scores, y)
    assert neg.sum() + pos.sum() == 5000
    assert abs(auc_from_histograms(neg, pos) - roc_auc_score(y, scores)) < 2e-3


def test_pooled_auc_from_summed_site_histograms():
    rng = np.random.default_rng(2)
    parts = []
    for shift in (0.0, 0.5, 1.0):
        y = rng.random(800) < 0.2
        s = 1 / (1 + np.exp(-(rng.normal(size=800) + shift + y)))
        parts.append((s, y))
    hists = [score_histograms(s, y) for s, y in parts]
    neg = sum(h[0] for h in hists)
    pos = sum(h[1] for h in hists)
    all_s = np.concatenate([s for s, _ in parts])
    all_y = np.concatenate([y for _, y in parts])
    assert abs(auc_from_histograms(neg, pos) - roc_auc_score(all_y, all_s)) < 2e-3


def test_auc_undefined_without_both_classes():
    assert np.isnan(auc_from_histograms(np.array([3, 0]), np.array([0, 0])))
    assert auc_from_histograms(np.array([0, 2]), np.array([2, 0])) == 0.0


def test_rates_and_prevalence_threshold_and_fairness_gaps():
    from consortia.core.metrics import fairness_from_groups, prevalence_threshold, rates_at_threshold

    # 4 bins; scores in bin 3 (>= 0.75) are the top quarter.
    neg = np.array([5, 3, 1, 1])
    pos = np.array([0, 0, 1, 1])
    assert rates_at_threshold(neg, pos, 0.5) == {"selection_rate": 4 / 12, "tpr": 1.0, "fpr": 2 / 10}
    # 2 of 12 rows are positive: the operating point flags the top bin (2 rows).
    assert prevalence_threshold(neg, pos) == 0.75
    out = fairness_from_groups(
        {"a": (np.array([4, 0, 1, 0]), np.array([0, 0, 0, 1])), "b": (np.array([1, 3, 0, 1]), np.array([0, 0, 1, 0]))}
    )
    assert out["threshold"] == 0.75
    assert out["groups"]["a"]["tpr"] == 1.0 and out["groups"]["b"]["tpr"] == 0.0
    assert out["equal_opportunity_gap"] == 1.0
    assert out["groups"]["a"]["auc"] == 1.0 and out["auc_gap"] == pytest.approx(1.0 - out["groups"]["b"]["auc"])
    assert out["demographic_parity_gap"] == pytest.approx(abs(1 / 6 - 1 / 6))
