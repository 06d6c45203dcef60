"""Histograms on bin edges agreed across sites: the raw material of privacy-preserving
monitoring. Pure numpy (runs on sites and on edge devices).

Agreeing edges without pooling data: each site sends a coarse quantile sketch of each
numeric feature (:func:`quantile_sketch`: the values at :data:`SKETCH_PROBS`, rounded to
three significant digits, only from at least ``min_count`` values); the coordinator
builds the mixture of the sites' piecewise-linear CDFs, weighted by their counts, and
reads the global deciles off it (:func:`merge_sketches`). Those nine cut points give ten
bins, roughly equally filled in the consortium's training data; the 1% and 99% points
give the expected range, outside which a value counts as out of range.

Profiles and monitoring windows are then counts on those bins (:func:`numeric_histogram`,
:func:`categorical_histogram`: agreed vocabulary plus one bin for anything else), and
before anything leaves a site, :func:`suppress` zeroes every bin with fewer than the
site's minimum count (reporting only how many rows were suppressed).

Examples
--------
>>> quantile_sketch(np.arange(1000.0), min_count=10)[:3]
[9.99, 50.0, 99.9]
>>> numeric_histogram(np.array([0.5, 1.5, np.nan, 9.0]), cuts=[1.0, 2.0], bounds=(0.0, 5.0))
([1, 1, 1], 1, 1)
>>> suppress([12, 3, 0, 40], min_count=5)
([12, 0, 0, 40], 3)
>>> coarsen([12, 3, 0, 40, 2], min_count=5, ordered=True)
([12, 45], [0, 1, 1, 1, 1], 0)
>>> coarsen([232, 43, 1, 0, 0], min_count=10, ordered=True)
([232, 44, 0, 0], [0, 1, 1, 2, 3], 0)
>>> regroup([100, 100, 100, 100, 100], [0, 1, 1, 1, 1])
[100, 400]
>>> common_groups([[0, 0, 1, 2], [0, 1, 1, 2]], bins=4)
[0, 0, 0, 1]
>>> onto([12, 5, 30], [0, 0, 1, 2], [0, 0, 0, 1])
[17, 30]
>>> expand([12, 30], [0, 0, 1])
[6.0, 6.0, 30.0]
>>> spread([13, 30], [0, 0, 0, 1])
[5, 4, 4, 30]

Zeroing small bins biases a histogram (a window of 100 rows loses every bin under the
minimum, and a homogeneity test would read that as drift); :func:`coarsen` instead merges
small bins (adjacent ones for ordered, numeric bins; all small categories together for
categorical ones) until every reported count is at least the minimum, and says which
original bins went into which group, so the reference can be compared on the same
groups (:func:`regroup`). Sites coarsen their reference profiles the same way; histograms
coarsened differently (two sites, or a window and the reference) are compared on their
finest common grouping (:func:`common_groups`, :func:`onto`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "DECILES",
    "SKETCH_PROBS",
    "bins_from_quantiles",
    "categorical_histogram",
    "coarsen",
    "common_groups",
    "expand",
    "onto",
    "spread",
    "regroup",
    "merge_sketches",
    "numeric_histogram",
    "quantile_sketch",
    "round_sig",
    "suppress",
]

SKETCH_PROBS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
DECILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def round_sig(x: float, digits: int = 3) -> float:
    """``x`` rounded to ``digits`` significant digits (so a sketch point is not a record's value)."""
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(round(x, digits - 1 - math.floor(math.log10(abs(x)))))


def quantile_sketch(values: np.ndarray, min_count: int) -> list[float] | None:
    """The values at :data:`SKETCH_PROBS` (linear interpolation), rounded to three
    significant digits; None when fewer than ``min_count`` non-missing values exist."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < max(min_count, 2):
        return None
    return [round_sig(float(v)) for v in np.quantile(x, SKETCH_PROBS)]


def merge_sketches(sketches: Sequence[tuple[Sequence[float], int]], probs: Sequence[float] = DECILES) -> list[float]:
    """Global quantiles at ``probs`` from per-site sketches ``(values at SKETCH_PROBS,
    count)``: each site's CDF is piecewise linear through its sketch points (flat at 0
    below the first and 1 above the last point, extended by the sketch's outer gaps),
    the mixture is weighted by counts, and it is inverted by bisection."""
    usable = [(np.asarray(q, dtype=np.float64), n) for q, n in sketches if q is not None and n > 0]
    if not usable:
        raise ValueError("no site sent a usable sketch for this feature.")
    for q, _ in usable:
        if q.shape != (len(SKETCH_PROBS),) or np.any(np.diff(q) < 0) or not np.all(np.isfinite(q)):
            raise ValueError(f"a sketch must hold {len(SKETCH_PROBS)} finite, non-decreasing values.")
    total = sum(n for _, n in usable)
    grid_p = np.concatenate([[0.0], SKETCH_PROBS, [1.0]])

    def site_points(q: np.ndarray) -> np.ndarray:
        span = max(q[-1] - q[0], 1e-12)
        return np.concatenate([[q[0] - 0.01 * span], q, [q[-1] + 0.01 * span]])

    points = [(site_points(q), n) for q, n in usable]

    def cdf(x: float) -> float:
        return sum(n * float(np.interp(x, pts, grid_p)) for pts, n in points) / total

    lo = min(float(p[0]) for p, _ in points)
    hi = max(float(p[-1]) for p, _ in points)
    out = []
    for target in probs:
        a, b = lo, hi
        for _ in range(100):
            mid = (a + b) / 2
            if cdf(mid) < target:
                a = mid
            else:
                b = mid
        out.append(round_sig((a + b) / 2, 4))
    return out


def bins_from_quantiles(quantiles: Sequence[float]) -> list[float]:
    """Strictly increasing cut points from merged deciles (ties collapse: a feature with
    few distinct values gets fewer bins)."""
    cuts: list[float] = []
    for q in quantiles:
        if not cuts or q > cuts[-1]:
            cuts.append(float(q))
    return cuts


def numeric_histogram(
    values: np.ndarray, cuts: Sequence[float], bounds: tuple[float, float] | None = None
) -> tuple[list[int], int, int]:
    """(counts per bin, missing, out of range) of ``values`` on bins ``(-inf, c1], (c1, c2],
    ..., (ck, inf)``; out of range means outside ``bounds`` (counted in a bin too)."""
    x = np.asarray(values, dtype=np.float64)
    missing = ~np.isfinite(x)
    ok = x[~missing]
    idx = np.searchsorted(np.asarray(cuts, dtype=np.float64), ok, side="left")
    counts = np.bincount(idx, minlength=len(cuts) + 1)
    oor = 0
    if bounds is not None:
        oor = int(np.count_nonzero((ok < bounds[0]) | (ok > bounds[1])))
    return [int(c) for c in counts], int(missing.sum()), oor


def categorical_histogram(
    values: Sequence[object], vocabulary: Sequence[str], missing_token: str
) -> tuple[list[int], int]:
    """(counts per vocabulary value plus one "other" bin, missing). ``missing_token`` is
    how missing values appear in ``values`` (they are counted as missing, not other)."""
    index = {v: i for i, v in enumerate(vocabulary)}
    counts = [0] * (len(vocabulary) + 1)
    missing = 0
    for v in values:
        if v is None or v == missing_token or (isinstance(v, float) and math.isnan(v)):
            missing += 1
            continue
        counts[index.get(str(v), len(vocabulary))] += 1
    return counts, missing


def suppress(counts: Sequence[int], min_count: int) -> tuple[list[int], int]:
    """Zero every bin with 0 < count < ``min_count``; returns (counts, rows suppressed)."""
    out, dropped = [], 0
    for c in counts:
        if 0 < c < min_count:
            out.append(0)
            dropped += int(c)
        else:
            out.append(int(c))
    return out, dropped


def coarsen(counts: Sequence[int], min_count: int, *, ordered: bool) -> tuple[list[int], list[int], int]:
    """Merge bins until every group holds 0 or at least ``min_count`` rows.

    Returns (group counts, the group of each original bin, rows suppressed). Ordered
    (numeric) bins merge with their neighbours, left to right, a short tail joining the
    group before it; unordered (categorical) bins under the minimum are pooled into one
    group (which joins the largest group if it is itself too small). Empty bins keep groups
    of their own where they can (0 is a permitted count; merging them would blur the
    comparison for nothing). A feature with fewer than ``min_count`` rows in all is
    suppressed entirely (one group, count 0)."""
    c = [int(x) for x in counts]
    total = sum(c)
    if total < min_count:
        return [0], [0] * len(c), total
    if ordered:
        groups, sums, run, full = [], [], 0, []
        for x in c:
            groups.append(len(sums))
            if x == 0 and run == 0:  # an empty bin may stand alone: 0 is a permitted count
                sums.append(0)
                continue
            run += x
            if run >= min_count:
                full.append(len(sums))
                sums.append(run)
                run = 0
        if run:  # a tail under the minimum joins the last full group
            last = full[-1]
            sums[last] += run
            del sums[last + 1 :]
            groups = [min(g, last) for g in groups]
        return _trim_empty(c, sums, groups)
    big = [i for i, x in enumerate(c) if x >= min_count]
    small = [i for i, x in enumerate(c) if 0 < x < min_count]
    empty = [i for i, x in enumerate(c) if x == 0]
    index = {b: k for k, b in enumerate(big)}
    sums = [c[b] for b in big]
    rest = sum(c[i] for i in small)
    rest_group = -1
    if small and rest >= min_count:
        sums.append(rest)
        rest_group = len(sums) - 1
    elif small:  # too few to stand alone: they join the largest group
        rest_group = max(range(len(sums)), key=lambda k: sums[k])
        sums[rest_group] += rest
    for i in empty:
        index[i] = len(sums)
        sums.append(0)
    groups = [index.get(i, rest_group) for i in range(len(c))]
    return sums, groups, 0


def _trim_empty(c: list[int], sums: list[int], groups: list[int]) -> tuple[list[int], list[int], int]:
    """Empty bins at either end of an ordered group leave it as groups of their own (count
    0): a group then spans only the range its rows fall in, so spreading its count over
    its bins later never puts rows where there were none."""
    out_sums: list[int] = []
    out_groups = [0] * len(c)
    i = 0
    while i < len(c):
        j = i
        while j + 1 < len(c) and groups[j + 1] == groups[i]:
            j += 1
        nonzero = [k for k in range(i, j + 1) if c[k]]
        lo, hi = (nonzero[0], nonzero[-1]) if nonzero else (j + 1, j)
        for k in range(i, j + 1):
            if lo <= k <= hi:
                if k == lo:
                    out_sums.append(sums[groups[i]])
                out_groups[k] = len(out_sums) - 1
            else:
                out_groups[k] = len(out_sums)
                out_sums.append(0)
        i = j + 1
    return out_sums, out_groups, 0


def regroup(counts: Sequence[int], groups: Sequence[int]) -> list[int]:
    """``counts`` (original bins) summed into ``groups`` (as :func:`coarsen` reports)."""
    if len(counts) != len(groups):
        raise ValueError(f"{len(counts)} counts but {len(groups)} group indices.")
    out = [0] * (max(groups) + 1 if groups else 0)
    for x, g in zip(counts, groups, strict=True):
        out[g] += int(x)
    return out


def common_groups(groupings: Sequence[Sequence[int] | None], bins: int) -> list[int]:
    """The finest grouping of ``bins`` bins that every grouping in ``groupings`` refines
    (None: ungrouped): two bins share a group if any grouping puts them together,
    transitively. Groups are numbered by their first bin, so contiguous groups of ordered
    bins stay in order."""
    parent = list(range(bins))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for groups in groupings:
        if groups is None:
            continue
        if len(groups) != bins:
            raise ValueError(f"a grouping of {len(groups)} bins where {bins} were expected.")
        first: dict[int, int] = {}
        for i, g in enumerate(groups):
            if g in first:
                parent[find(i)] = find(first[g])
            else:
                first[g] = i
    labels: dict[int, int] = {}
    return [labels.setdefault(find(i), len(labels)) for i in range(bins)]


def onto(counts: Sequence[int], groups: Sequence[int] | None, target: Sequence[int]) -> list[int]:
    """Counts reported on ``groups`` (None: one count per bin) summed onto ``target``, a
    grouping that ``groups`` refines (see :func:`common_groups`)."""
    own = list(groups) if groups is not None else list(range(len(target)))
    if len(own) != len(target):
        raise ValueError(f"{len(own)} bins grouped, but the target grouping covers {len(target)}.")
    out = [0] * (max(target) + 1 if target else 0)
    done: set[int] = set()
    for g, t in zip(own, target, strict=True):
        if g not in done:
            done.add(g)
            out[t] += int(counts[g])
    return out


def expand(counts: Sequence[float], groups: Sequence[int] | None) -> list[float]:
    """Per-bin counts from grouped ones, each group's count spread evenly over its bins
    (an approximation for drawing values or reading a threshold, never for a test)."""
    if groups is None:
        return [float(c) for c in counts]
    size = [0] * len(counts)
    for g in groups:
        size[g] += 1
    return [float(counts[g]) / size[g] for g in groups]


def spread(counts: Sequence[int], groups: Sequence[int] | None) -> list[int]:
    """Per-bin whole counts from grouped ones: each group's count spread evenly over its
    bins, remainders to its first bins, so totals are exact (how the coordinator sums
    references that sites coarsened differently)."""
    if groups is None:
        return [int(c) for c in counts]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = [0] * len(groups)
    for g, bins in members.items():
        q, r = divmod(int(counts[g]), len(bins))
        for k, i in enumerate(bins):
            out[i] = q + (1 if k < r else 0)
    return out
