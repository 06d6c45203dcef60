"""Distribution shift between histograms on shared bin edges. Pure numpy.

:func:`psi` is the population stability index, ``sum((p - q) * ln(p / q))`` over bins,
with additive smoothing so empty bins stay finite. Used by rollout analysis to compare a
canary's prediction histogram with the previous release's; the monitoring work extends
this module (more statistics, sample-size-aware thresholds).

Examples
--------
>>> round(psi([50, 50], [50, 50]), 6)
0.0
>>> psi([90, 10], [50, 50]) > 0.3
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["psi"]


def psi(current: Sequence[float], reference: Sequence[float], smoothing: float = 0.5) -> float:
    """Population stability index of ``current`` against ``reference`` (counts per bin)."""
    p = np.asarray(current, dtype=np.float64) + smoothing
    q = np.asarray(reference, dtype=np.float64) + smoothing
    if p.shape != q.shape or p.ndim != 1 or len(p) < 2:
        raise ValueError(f"histograms must be 1-D with the same >= 2 bins, got {p.shape} and {q.shape}.")
    if np.any(p < 0) or np.any(q < 0):
        raise ValueError("histogram counts must be >= 0.")
    p /= p.sum()
    q /= q.sum()
    return float(np.sum((p - q) * np.log(p / q)))
