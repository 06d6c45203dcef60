"""Local evaluation: loss, accuracy, AUC and the per-class score histograms that let the
coordinator compute a pooled AUC without seeing a single prediction."""

from __future__ import annotations

import numpy as np

from consortia.core.metrics import auc_from_histograms, score_histograms
from consortia.protocol.schemas import EvaluationResult

__all__ = ["evaluate_scores"]


def evaluate_scores(scores: np.ndarray, y: np.ndarray) -> EvaluationResult:
    """Metrics of predicted probabilities ``scores`` against 0/1 labels ``y``."""
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    neg, pos = score_histograms(scores, y)
    if len(y) == 0:
        return EvaluationResult(n=0, loss=0.0, accuracy=0.0, auc=None, neg_hist=neg.tolist(), pos_hist=pos.tolist())
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    loss = float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))
    accuracy = float(np.mean((scores >= 0.5) == y))
    auc = auc_from_histograms(neg, pos)
    return EvaluationResult(
        n=int(len(y)),
        loss=loss,
        accuracy=accuracy,
        auc=None if np.isnan(auc) else float(auc),
        neg_hist=neg.tolist(),
        pos_hist=pos.tolist(),
    )
