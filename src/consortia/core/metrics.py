"""Evaluation metrics computed from aggregates, never from individual predictions.

Sites report, per class, a histogram of predicted scores on fixed bin edges over [0, 1].
Summed over sites, these histograms give a pooled ROC AUC without any prediction leaving
its site; with 1,000 bins the result matches the exact AUC to about 1e-3.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "SCORE_BINS",
    "auc_from_histograms",
    "fairness_from_groups",
    "prevalence_threshold",
    "rates_at_threshold",
    "score_histograms",
]

SCORE_BINS = 1000


def score_histograms(scores: np.ndarray, labels: np.ndarray, bins: int = SCORE_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Counts of negative and positive examples per score bin on ``[0, 1]``.

    Returns ``(neg_counts, pos_counts)``, each an int64 array of length ``bins``.
    """
    scores = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    labels = np.asarray(labels).astype(bool)
    idx = np.minimum((scores * bins).astype(np.int64), bins - 1)
    neg = np.bincount(idx[~labels], minlength=bins).astype(np.int64)
    pos = np.bincount(idx[labels], minlength=bins).astype(np.int64)
    return neg, pos


def auc_from_histograms(neg: np.ndarray, pos: np.ndarray) -> float:
    """ROC AUC ``P(score_pos > score_neg) + 0.5 P(same bin)`` from per-class histograms.

    Returns NaN when either class is empty (AUC is undefined there).

    Examples
    --------
    >>> auc_from_histograms(np.array([1, 0]), np.array([0, 1]))
    1.0
    """
    neg = np.asarray(neg, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.float64)
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg  # negatives strictly in lower bins
    wins = float(np.sum(pos * neg_below) + 0.5 * np.sum(pos * neg))
    return wins / float(n_neg * n_pos)


def rates_at_threshold(neg: np.ndarray, pos: np.ndarray, threshold: float = 0.5) -> dict[str, float | None]:
    """Selection rate, true-positive rate and false-positive rate when scores at or above
    ``threshold`` are predicted positive (bins are whole: the threshold is rounded down
    to a bin edge). Undefined rates are None.

    Examples
    --------
    >>> rates_at_threshold(np.array([3, 1]), np.array([1, 3]))
    {'selection_rate': 0.5, 'tpr': 0.75, 'fpr': 0.25}
    """
    neg = np.asarray(neg, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.float64)
    cut = min(int(threshold * len(neg)), len(neg))
    tp, fp = float(pos[cut:].sum()), float(neg[cut:].sum())
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    n = n_pos + n_neg
    return {
        "selection_rate": (tp + fp) / n if n else None,
        "tpr": tp / n_pos if n_pos else None,
        "fpr": fp / n_neg if n_neg else None,
    }


def prevalence_threshold(neg: np.ndarray, pos: np.ndarray) -> float:
    """The bin edge at which the share of rows scored at or above it is closest to the
    share of positives: an operating point that flags as many rows as there are positive
    cases (a fixed 0.5 flags nobody when positives are rare)."""
    neg = np.asarray(neg, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.float64)
    total = neg.sum() + pos.sum()
    if total == 0:
        return 0.5
    above = np.cumsum((neg + pos)[::-1])[::-1] / total  # share at or above each bin's lower edge
    cut = int(np.argmin(np.abs(above - pos.sum() / total)))
    return cut / len(neg)


def fairness_from_groups(
    groups: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float | None = None
) -> dict[str, object]:
    """Per-group AUC and rates from pooled per-group histograms, and the largest gaps
    between groups (AUC gap, demographic-parity gap, equal-opportunity (TPR) gap).

    Rates use ``threshold``; by default the :func:`prevalence_threshold` of all groups
    pooled, so the comparison happens at an operating point where the model flags rows.
    """
    if threshold is None:
        threshold = prevalence_threshold(sum(g[0] for g in groups.values()), sum(g[1] for g in groups.values()))
    per: dict[str, dict[str, float | int | None]] = {}
    for g, (neg, pos) in sorted(groups.items()):
        auc = auc_from_histograms(neg, pos)
        per[g] = {
            "n": int(np.sum(neg) + np.sum(pos)),
            "auc": None if np.isnan(auc) else auc,
            **rates_at_threshold(neg, pos, threshold),
        }

    def gap(key: str) -> float | None:
        vals = [float(v[key]) for v in per.values() if v[key] is not None]  # type: ignore[arg-type]
        return max(vals) - min(vals) if len(vals) >= 2 else None

    return {
        "threshold": threshold,
        "groups": per,
        "auc_gap": gap("auc"),
        "demographic_parity_gap": gap("selection_rate"),
        "equal_opportunity_gap": gap("tpr"),
    }
