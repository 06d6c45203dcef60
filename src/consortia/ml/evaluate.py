"""Local evaluation: loss, accuracy, AUC and the per-class score histograms that let the
coordinator compute a pooled AUC without seeing a single prediction.

With a sensitive attribute, each group with at least ``min_count`` rows also gets its
own histograms (for pooled fairness metrics); smaller groups are suppressed and only
their number is reported. ``share`` (from the site policy) drops what the site does not
share.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from consortia.core.metrics import auc_from_histograms, score_histograms
from consortia.protocol.schemas import EvaluationResult, GroupEvaluation

__all__ = ["evaluate_scores"]

ALL = ("auc", "score_histograms", "fairness")


def evaluate_scores(
    scores: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    min_count: int = 1,
    share: Collection[str] = ALL,
) -> EvaluationResult:
    """Metrics of predicted probabilities ``scores`` against 0/1 labels ``y``.

    ``groups`` holds the sensitive attribute's value per row (missing values form the
    group ``"<missing>"``).
    """
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    neg, pos = score_histograms(scores, y)
    n = int(len(y))
    if n == 0:
        loss, accuracy, auc = 0.0, 0.0, float("nan")
    else:
        p = np.clip(scores, 1e-7, 1 - 1e-7)
        loss = float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))
        accuracy = float(np.mean((scores >= 0.5) == y))
        auc = auc_from_histograms(neg, pos)
    by_group: dict[str, GroupEvaluation] | None = None
    suppressed = 0
    if groups is not None and "fairness" in share and "score_histograms" in share:
        by_group = {}
        values = np.asarray(groups, dtype=object)
        keys = np.array(["<missing>" if v is None or v != v else str(v) for v in values], dtype=object)
        for g in sorted(set(keys.tolist())):
            mask = keys == g
            if int(mask.sum()) < min_count:
                suppressed += 1
                continue
            gn, gp = score_histograms(scores[mask], y[mask])
            by_group[g] = GroupEvaluation(n=int(mask.sum()), neg_hist=gn.tolist(), pos_hist=gp.tolist())
    hist = "score_histograms" in share
    return EvaluationResult(
        n=n,
        loss=loss,
        accuracy=accuracy,
        auc=None if np.isnan(auc) or "auc" not in share else float(auc),
        neg_hist=neg.tolist() if hist else [],
        pos_hist=pos.tolist() if hist else [],
        groups=by_group,
        suppressed_groups=suppressed,
    )
