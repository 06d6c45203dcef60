"""Distribution shift between histograms on shared bin edges, calibrated for sample size
and for many features at once, and sequential change detectors. Pure numpy (scipy for
the chi-square distribution).

Effect sizes (how far apart two histograms are):

- :func:`psi`, the population stability index ``sum((p - q) * ln(p / q))`` (Jeffreys
  divergence), with additive smoothing so empty bins stay finite;
- :func:`js_distance`, the Jensen-Shannon distance (base 2, in [0, 1]);
- :func:`wasserstein_binned`, the earth mover's distance between two histograms on the
  same numeric bin edges (mass at bin centres), in the feature's units;
- :func:`missing_rate_change`, the change of a missing (or out-of-range) rate.

Significance (is the difference more than sampling noise?): :func:`chi_square` is the
chi-square test of homogeneity of the 2 x k table (current vs reference counts), so a
window of 100 rows needs a much larger shift to count than a window of 100,000 (a fixed
``PSI > 0.1`` fires on a large share of no-drift windows of 100 rows, see
``tests/core/test_drift.py``). :func:`two_proportion` tests a rate change.
:func:`benjamini_hochberg` controls the false discovery rate over many features, and
:func:`drift_test` puts it together for one feature: p-value and effect size.

Sequential detectors for metric series (latency, error rate, accuracy), with River's
shape (``update(x)`` then ``drift_detected``): :class:`PageHinkley` and :class:`Cusum`.

Examples
--------
>>> round(psi([50, 50], [50, 50]), 6)
0.0
>>> psi([90, 10], [50, 50]) > 0.3
True
>>> chi_square([55, 45], [5000, 5000]).p_value > 0.05    # 100 rows: noise
True
>>> chi_square([5500, 4500], [5000, 5000]).p_value < 1e-6  # same shift, 10,000 rows
True

References
----------
Benjamini & Hochberg (1995), Controlling the false discovery rate. Page (1954),
Continuous inspection schemes (CUSUM). Hinkley (1971), Inference about the change-point
from cumulative sum tests. River's ``drift.PageHinkley`` (online-ml/river) for the shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_EXPECTED",
    "ChiSquareResult",
    "Cusum",
    "DriftTest",
    "PageHinkley",
    "benjamini_hochberg",
    "chi_square",
    "drift_test",
    "js_distance",
    "missing_rate_change",
    "psi",
    "two_proportion",
    "wasserstein_binned",
]


def _pair(current: Sequence[float], reference: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(current, dtype=np.float64)
    q = np.asarray(reference, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1 or len(p) < 2:
        raise ValueError(f"histograms must be 1-D with the same >= 2 bins, got {p.shape} and {q.shape}.")
    if np.any(p < 0) or np.any(q < 0) or not (np.all(np.isfinite(p)) and np.all(np.isfinite(q))):
        raise ValueError("histogram counts must be finite and >= 0.")
    return p, q


def psi(current: Sequence[float], reference: Sequence[float], smoothing: float = 0.5) -> float:
    """Population stability index of ``current`` against ``reference`` (counts per bin)."""
    p, q = _pair(current, reference)
    p, q = p + smoothing, q + smoothing
    p /= p.sum()
    q /= q.sum()
    return float(np.sum((p - q) * np.log(p / q)))


def js_distance(current: Sequence[float], reference: Sequence[float]) -> float:
    """Jensen-Shannon distance (square root of the JS divergence, base 2): 0 for equal
    distributions, 1 for disjoint ones."""
    p, q = _pair(current, reference)
    if p.sum() == 0 or q.sum() == 0:
        raise ValueError("both histograms need at least one count.")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def wasserstein_binned(current: Sequence[float], reference: Sequence[float], edges: Sequence[float]) -> float:
    """Earth mover's distance between two histograms on ``edges`` (len = bins + 1), mass
    at bin centres: the integral of the absolute difference of the two CDFs. Open outer
    bins (infinite edges) take the width of their neighbour."""
    p, q = _pair(current, reference)
    e = np.asarray(edges, dtype=np.float64)
    if e.shape != (len(p) + 1,):
        raise ValueError(f"need {len(p) + 1} edges for {len(p)} bins, got {e.shape}.")
    e = e.copy()
    if len(e) >= 3:
        if not np.isfinite(e[0]):
            e[0] = e[1] - (e[2] - e[1])
        if not np.isfinite(e[-1]):
            e[-1] = e[-2] + (e[-2] - e[-3])
    if np.any(np.diff(e) < 0) or not np.all(np.isfinite(e)):
        raise ValueError("edges must be finite (or open at the ends) and increasing.")
    if p.sum() == 0 or q.sum() == 0:
        raise ValueError("both histograms need at least one count.")
    centres = (e[:-1] + e[1:]) / 2
    cdf = np.cumsum(p / p.sum() - q / q.sum())[:-1]
    return float(np.sum(np.abs(cdf) * np.diff(centres)))


def missing_rate_change(current_missing: int, current_n: int, ref_missing: int, ref_n: int) -> float:
    """Current rate minus reference rate (positive: more missing now)."""
    if current_n <= 0 or ref_n <= 0:
        raise ValueError("both windows need at least one row.")
    return current_missing / current_n - ref_missing / ref_n


@dataclass(frozen=True)
class ChiSquareResult:
    statistic: float
    dof: int
    p_value: float


MIN_EXPECTED = 5.0
"""Cochran's rule: cells expected to hold fewer rows than this are pooled before a
chi-square test (the chi-square approximation is anti-conservative below it)."""


def _pool_sparse(p: np.ndarray, q: np.ndarray, n: float, m: float) -> tuple[np.ndarray, np.ndarray]:
    """Merge the cell with the smallest expected count into its smaller neighbour until
    every cell's expected count in both samples is at least :data:`MIN_EXPECTED` (or two
    cells remain). Neighbours, so ordered bins stay contiguous."""
    p, q = list(p), list(q)
    while len(p) > 2:
        expected = [min((a + b) * n, (a + b) * m) / (n + m) for a, b in zip(p, q, strict=True)]
        i = int(np.argmin(expected))
        if expected[i] >= MIN_EXPECTED:
            break
        if i == 0:
            j = 1
        elif i == len(p) - 1:
            j = i - 1
        else:
            j = i - 1 if p[i - 1] + q[i - 1] <= p[i + 1] + q[i + 1] else i + 1
        lo, hi = min(i, j), max(i, j)
        p[lo : hi + 1] = [p[lo] + p[hi]]
        q[lo : hi + 1] = [q[lo] + q[hi]]
    return np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)


def chi_square(current: Sequence[float], reference: Sequence[float]) -> ChiSquareResult:
    """Chi-square test of homogeneity of ``current`` and ``reference`` counts. Bins empty
    in both are dropped and sparse cells pooled (:data:`MIN_EXPECTED`); fewer than two
    cells gives p = 1 (nothing to test)."""
    from scipy.stats import chi2

    p, q = _pair(current, reference)
    keep = (p + q) > 0
    p, q = p[keep], q[keep]
    n, m = p.sum(), q.sum()
    if len(p) < 2 or n == 0 or m == 0:
        return ChiSquareResult(0.0, 0, 1.0)
    p, q = _pool_sparse(p, q, n, m)
    total = p + q
    ep, eq = total * n / (n + m), total * m / (n + m)
    stat = float(np.sum((p - ep) ** 2 / ep) + np.sum((q - eq) ** 2 / eq))
    dof = len(p) - 1
    return ChiSquareResult(stat, dof, float(chi2.sf(stat, dof)))


def two_proportion(current_hits: int, current_n: int, ref_hits: int, ref_n: int) -> ChiSquareResult:
    """Two-sided test that two rates are equal: chi-square with 1 dof, or Fisher's exact
    test when a cell is expected to hold fewer than :data:`MIN_EXPECTED` rows (rare events
    in small windows, where the approximation fires far too often)."""
    if current_n <= 0 or ref_n <= 0:
        return ChiSquareResult(0.0, 0, 1.0)
    hits, n = current_hits + ref_hits, current_n + ref_n
    if min(hits, n - hits) * min(current_n, ref_n) / n < MIN_EXPECTED:
        from scipy.stats import fisher_exact

        table = [[current_hits, current_n - current_hits], [ref_hits, ref_n - ref_hits]]
        return ChiSquareResult(0.0, 1, float(fisher_exact(table).pvalue))
    return chi_square([current_hits, current_n - current_hits], [ref_hits, ref_n - ref_hits])


def benjamini_hochberg(p_values: Sequence[float], q: float = 0.05) -> list[bool]:
    """Which hypotheses to reject at false discovery rate ``q`` (Benjamini-Hochberg step-up)."""
    if not 0 < q < 1:
        raise ValueError(f"q == {q}, must be in (0, 1).")
    pv = np.asarray(p_values, dtype=np.float64)
    if pv.size == 0:
        return []
    if np.any((pv < 0) | (pv > 1) | ~np.isfinite(pv)):
        raise ValueError("p-values must be in [0, 1].")
    order = np.argsort(pv, kind="stable")
    m = len(pv)
    below = pv[order] <= q * np.arange(1, m + 1) / m
    reject = np.zeros(m, dtype=bool)
    if below.any():
        k = int(np.nonzero(below)[0].max())
        reject[order[: k + 1]] = True
    return reject.tolist()


@dataclass(frozen=True)
class DriftTest:
    """One feature's comparison: p-value (homogeneity), effect sizes, window sizes."""

    p_value: float
    psi: float
    js: float
    n_current: int
    n_reference: int


def drift_test(current: Sequence[float], reference: Sequence[float]) -> DriftTest:
    """Chi-square homogeneity p-value plus PSI and JS effect sizes for one histogram pair."""
    p, q = _pair(current, reference)
    res = chi_square(p, q)
    js = js_distance(p, q) if p.sum() > 0 and q.sum() > 0 else 0.0
    return DriftTest(res.p_value, psi(p, q), js, int(p.sum()), int(q.sum()))


class PageHinkley:
    """Page-Hinkley test for an increase of the mean of a series (``mode="up"``), a
    decrease (``"down"``) or either (``"both"``). ``delta`` is the magnitude of change
    tolerated, ``threshold`` (lambda) the alarm level, ``min_instances`` a warm-up.
    After an alarm the detector resets, as River's does."""

    def __init__(
        self,
        *,
        delta: float = 0.005,
        threshold: float = 50.0,
        min_instances: int = 30,
        alpha: float = 1.0,
        mode: str = "both",
    ) -> None:
        if mode not in ("up", "down", "both"):
            raise ValueError(f"mode == {mode!r}, must be 'up', 'down' or 'both'.")
        if threshold <= 0 or delta < 0 or min_instances < 1 or not 0 < alpha <= 1:
            raise ValueError("need threshold > 0, delta >= 0, min_instances >= 1, 0 < alpha <= 1.")
        self.delta, self.threshold, self.min_instances, self.alpha, self.mode = (
            delta,
            threshold,
            min_instances,
            alpha,
            mode,
        )
        self._reset()
        self.drift_detected = False

    def _reset(self) -> None:
        self.n = 0
        self.mean = 0.0
        self._sum_up = self._min_up = 0.0
        self._sum_down = self._max_down = 0.0

    def update(self, x: float) -> PageHinkley:
        if self.drift_detected:
            self._reset()
            self.drift_detected = False
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"observation {x!r} is not finite.")
        self.n += 1
        self.mean += (x - self.mean) / self.n
        self._sum_up = self.alpha * self._sum_up + (x - self.mean - self.delta)
        self._min_up = min(self._min_up, self._sum_up)
        self._sum_down = self.alpha * self._sum_down + (x - self.mean + self.delta)
        self._max_down = max(self._max_down, self._sum_down)
        if self.n >= self.min_instances:
            up = self._sum_up - self._min_up > self.threshold
            down = self._max_down - self._sum_down > self.threshold
            self.drift_detected = (self.mode in ("up", "both") and up) or (self.mode in ("down", "both") and down)
        return self


class Cusum:
    """Two-sided tabular CUSUM against a target mean learnt during warm-up: alarms when
    the cumulative deviation beyond ``k`` standard deviations exceeds ``h`` standard
    deviations (Page 1954; the usual k = 0.5, h = 5 detect a one-sigma shift with an
    in-control run length near 465). Resets after an alarm."""

    def __init__(self, *, k: float = 0.5, h: float = 5.0, warmup: int = 30) -> None:
        if k < 0 or h <= 0 or warmup < 2:
            raise ValueError("need k >= 0, h > 0 and warmup >= 2.")
        self.k, self.h, self.warmup = k, h, warmup
        self.drift_detected = False
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self._mean = 0.0
        self._m2 = 0.0
        self.pos = self.neg = 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / (self.n - 1)) if self.n > 1 else 0.0

    def update(self, x: float) -> Cusum:
        if self.drift_detected:
            self._reset()
            self.drift_detected = False
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"observation {x!r} is not finite.")
        if self.n < self.warmup:  # learn the in-control mean and spread (Welford)
            self.n += 1
            d = x - self._mean
            self._mean += d / self.n
            self._m2 += d * (x - self._mean)
            return self
        sigma = self.std or 1e-12
        z = (x - self._mean) / sigma
        self.pos = max(0.0, self.pos + z - self.k)
        self.neg = max(0.0, self.neg - z - self.k)
        self.drift_detected = self.pos > self.h or self.neg > self.h
        return self
