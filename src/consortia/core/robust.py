"""Byzantine-robust aggregation rules over the sites' update vectors.

Each rule takes the round's updates as deltas from the current global model (one row per
site, flattened) and returns the delta to apply, in place of the example-weighted mean.
The coordinator adds that delta to the current model and hands the result to the job's
server strategy (FedAvg, FedAdam, ...), so a rule wraps any strategy instead of replacing
it. Robust rules give each site's update the same say: a site's example count is its own
claim, and a poisoner would simply claim more examples. :class:`NormBound` alone keeps the
example weights (it only bounds each update's size).

Every rule checks its precondition on the number of sites ``n`` and tolerated Byzantine
sites ``f`` when it is built for a round (:meth:`RobustRule.check`) and raises
:class:`~consortia.errors.StrategyError` saying how many sites it needs. Each also reports
which sites it flagged as outliers (far from the robust aggregate), which the coordinator
counts towards quarantine.

All rules need every individual update in memory (``n x d`` floats): they cannot run on a
securely aggregated sum, and a job that asks for both is refused at validation.

References
----------
Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017 (Krum, Multi-Krum).
Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018 (coordinate-wise median, trimmed mean).
El Mhamdi et al., "The Hidden Vulnerability of Distributed Learning in Byzantium",
ICML 2018 (Bulyan).
Sun et al., "Can You Really Backdoor Federated Learning?", 2019 (norm bounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from consortia.core.params import Params
from consortia.errors import StrategyError

__all__ = [
    "DEFAULT_RULE",
    "ROBUST_RULES",
    "Bulyan",
    "CenteredClip",
    "CoordinateMedian",
    "Krum",
    "MultiKrum",
    "NormBound",
    "RobustResult",
    "RobustRule",
    "TrimmedMean",
    "flatten",
    "make_rule",
    "outliers",
    "unflatten",
]


@dataclass(frozen=True)
class RobustResult:
    """What a rule returns: the delta to apply and the sites it set aside.

    ``delta`` is flat (float64, length ``d``); ``flagged`` holds the row indices of the
    updates that are outliers around the result (:func:`outliers`; for norm bounding, the
    clipped ones); ``selected`` those the Krum family kept, or ``None`` for coordinate-wise
    rules. Only ``flagged`` counts towards quarantine: Krum leaving out an honest but
    unusual site on non-IID data is not evidence against it.
    """

    delta: np.ndarray
    flagged: tuple[int, ...] = ()
    selected: tuple[int, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class RobustRule(Protocol):
    """A Byzantine-robust replacement for the weighted mean of the updates."""

    name: str
    f: int

    def check(self, n: int) -> None:
        """Raise :class:`StrategyError` unless ``n`` updates satisfy the precondition."""
        ...

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> RobustResult:
        """Combine ``deltas`` (``n x d``) with example ``weights`` (``n``)."""
        ...


def flatten(params: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """Concatenate the named arrays, in ``names`` order, into one float64 vector."""
    return np.concatenate([np.asarray(params[k], np.float64).reshape(-1) for k in names]) if names else np.zeros(0)


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray], names: Sequence[str]) -> Params:
    """Split ``vector`` back into float32 arrays shaped like ``like``."""
    out: Params = {}
    offset = 0
    for k in names:
        size = int(np.size(like[k]))
        out[k] = vector[offset : offset + size].reshape(np.shape(like[k])).astype(np.float32)
        offset += size
    if offset != vector.size:
        raise StrategyError(f"vector has {vector.size} values, the model {offset}.")
    return out


def _check_f(f: int) -> None:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise StrategyError(f"f == {f!r}, must be an integer >= 0 (the Byzantine sites to tolerate).")


def _square_distances(x: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances between the rows of ``x`` (Gram form)."""
    sq = np.einsum("ij,ij->i", x, x)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def _krum_scores(d2: np.ndarray, f: int) -> np.ndarray:
    """Sum of squared distances from each row to its ``n - f - 2`` nearest others."""
    n = d2.shape[0]
    k = n - f - 2
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(d2[i], i)
        scores[i] = np.sum(np.partition(others, k - 1)[:k]) if k > 0 else 0.0
    return scores


def outliers(deltas: np.ndarray, center: np.ndarray, *, z: float = 3.5) -> tuple[int, ...]:
    """Rows whose distance to ``center`` is far above the others' (robust z-score).

    The distances' median and median absolute deviation (scaled to a standard deviation)
    set the scale, so a minority of poisoned rows cannot hide by moving it. A row is an
    outlier when its distance exceeds ``median + z * 1.4826 * MAD`` and three times the
    median (with five sites, honest spread alone passes twice the median now and then).
    """
    dist = np.linalg.norm(deltas - center[None, :], axis=1)
    med = float(np.median(dist))
    mad = float(np.median(np.abs(dist - med))) * 1.4826
    limit = max(med + z * mad, 3.0 * med)
    if limit <= 0.0:
        return ()
    return tuple(int(i) for i in np.flatnonzero(dist > limit))


@dataclass(frozen=True)
class Krum:
    """Krum: keep the one update closest to its ``n - f - 2`` nearest neighbours.

    Needs ``n > 2f + 2``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.0], [0.1], [0.2], [0.15], [50.0]])
    >>> Krum(f=1).combine(x, np.ones(5)).delta.tolist()
    [0.15]
    """

    f: int = 1
    name: str = "krum"

    def __post_init__(self) -> None:
        _check_f(self.f)

    def check(self, n: int) -> None:
        if n <= 2 * self.f + 2:
            raise StrategyError(
                f"{self.name} with f == {self.f} needs n > 2f + 2 = {2 * self.f + 2} updates, got {n}; "
                "lower f or raise min_sites."
            )

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> RobustResult:
        n = deltas.shape[0]
        self.check(n)
        scores = _krum_scores(_square_distances(deltas), self.f)
        best = int(np.argmin(scores))
        return RobustResult(deltas[best].copy(), outliers(deltas, deltas[best]), (best,), {"scores": scores.tolist()})


@dataclass(frozen=True)
class MultiKrum:
    """Multi-Krum: average the ``m`` updates with the lowest Krum scores.

    ``m`` defaults to ``n - f``. Needs ``n > 2f + 2``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.0], [0.2], [0.1], [0.3], [50.0]])
    >>> r = MultiKrum(f=1).combine(x, np.ones(5))
    >>> round(float(r.delta[0]), 3), r.flagged
    (0.15, (4,))
    """

    f: int = 1
    m: int | None = None
    name: str = "multi_krum"

    def __post_init__(self) -> None:
        _check_f(self.f)
        if self.m is not None and (isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1):
            raise StrategyError(f"m == {self.m!r}, must be an integer >= 1 (updates to average).")

    def check(self, n: int) -> None:
        Krum(self.f, name=self.name).check(n)
        if self.m is not None and self.m > n:
            raise StrategyError(f"{self.name}: m == {self.m} exceeds the {n} updates received.")

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> RobustResult:
        n = deltas.shape[0]
        self.check(n)
        m = self.m if self.m is not None else n - self.f
        scores = _krum_scores(_square_distances(deltas), self.f)
        chosen = tuple(sorted(int(i) for i in np.argsort(scores, kind="stable")[:m]))
        center = deltas[list(chosen)].mean(axis=0)
        return RobustResult(center, outliers(deltas, center), chosen, {"scores": scores.tolist()})


@dataclass(frozen=True)
class CoordinateMedian:
    """Coordinate-wise median of the updates. Needs ``n >= 2f + 1``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0, 10.0], [2.0, 20.0], [100.0, -100.0]])
    >>> CoordinateMedian(f=1).combine(x, np.ones(3)).delta.tolist()
    [2.0, 10.0]
    """

    f: int = 1
    name: str = "median"

    def __post_init__(self) -> None:
        _check_f(self.f)

    def check(self, n: int) -> None:
        if n < 2 * self.f + 1:
            raise StrategyError(
                f"median with f == {self.f} needs n >= 2f + 1 = {2 * self.f + 1} updates, got {n}; "
                "a Byzantine majority can move any median."
            )

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> RobustResult:
        self.check(deltas.shape[0])
        center = np.median(deltas, axis=0)
        return RobustResult(center, outliers(deltas, center))


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean: per coordinate, drop the ``floor(beta * n)`` largest
    and smallest values and average the rest. Needs ``beta >= f / n`` and ``2 floor(beta n) < n``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0], [2.0], [3.0], [4.0], [1000.0]])
    >>> TrimmedMean(f=1, beta=0.2).combine(x, np.ones(5)).delta.tolist()
    [3.0]
    """

    f: int = 1
    beta: float = 0.2
    name: str = "trimmed_mean"

    def __post_init__(self) -> None:
        _check_f(self.f)
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and 0.0 <= self.beta < 0.5):
            raise StrategyError(f"beta == {self.beta!r}, must be in [0, 0.5) (the share trimmed at each end).")

    def trim(self, n: int) -> int:
        return int(math.floor(self.beta * n + 1e-9))

    def check(self, n: int) -> None:
        k = self.trim(n)
        if k < self.f:
            raise StrategyError(
                f"trimmed_mean: beta == {self.beta} trims {k} of {n} updates per end, fewer than f == {self.f}; "
                f"beta must be >= f / n = {self.f / max(n, 1):.3f}."
            )
        if n - 2 * k < 1:
            raise StrategyError(f"trimmed_mean: beta == {self.beta} trims all {n} updates; lower beta.")

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> RobustResult:
        n = deltas.shape[0]
        self.check(n)
        k = self.trim(n)
        ordered = np.sort(deltas, axis=0)
        center = ordered[k : n - k].mean(axis=0)
        return RobustResult(center, outliers(deltas, center), info={"trimmed_per_end": k})


@dataclass(frozen=True)
class Bulyan:
    """Bulyan: pick ``theta = n - 2f`` updates by repeated Krum, then average, per
    coordinate, the ``theta - 2f`` values closest to their median. Needs ``n >= 4f + 3``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.0], [0.1], [0.2], [0.3], [0.4], [0.5], [90.0]])
    >>> r = Bulyan(f=1).combine(x, np.ones(7))
    >>> round(float(r.delta[0]), 3), 6 in r.flagged
    (0.2, True)
    """

    f: int = 1
    name: str = "bulyan"

    def __post_init__(self) -> None:
        _check_f(self.f)

    def check(self, n: int) -> None:
        if n < 4 * self.f + 3:
            raise StrategyError(
                f"bulyan with f == {self.f} needs n >= 4f + 3 = {4 * self.f + 3} updates, got {n}; "
                "lower f, raise min_sites, or use trimmed_mean."
            )

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> RobustResult:
        n = deltas.shape[0]
        self.check(n)
        theta = n - 2 * self.f
        d2_all = _square_distances(deltas)
        remaining = list(range(n))
        chosen: list[int] = []
        while len(chosen) < theta:
            sub = d2_all[np.ix_(remaining, remaining)]
            f_eff = min(self.f, max(len(remaining) - 3, 0))
            pick = remaining[int(np.argmin(_krum_scores(sub, f_eff)))]
            chosen.append(pick)
            remaining.remove(pick)
        sel = deltas[sorted(chosen)]
        beta = theta - 2 * self.f
        med = np.median(sel, axis=0)
        nearest = np.argsort(np.abs(sel - med[None, :]), axis=0, kind="stable")[:beta]
        center = np.take_along_axis(sel, nearest, axis=0).mean(axis=0)
        return RobustResult(center, outliers(deltas, center), tuple(sorted(chosen)))


@dataclass(frozen=True)
class NormBound:
    """Norm bounding: scale every update down to at most ``max_norm``, then take the
    example-weighted mean. Runs with any ``n`` (``f`` is not used); the clipped updates
    are flagged.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[3.0, 4.0], [0.3, 0.4]])
    >>> NormBound(max_norm=1.0).combine(x, np.ones(2)).delta.round(3).tolist()
    [0.45, 0.6]
    """

    max_norm: float = 1.0
    f: int = 0
    name: str = "norm_bound"

    def __post_init__(self) -> None:
        _check_f(self.f)
        if not (isinstance(self.max_norm, int | float) and math.isfinite(self.max_norm) and self.max_norm > 0):
            raise StrategyError(f"max_norm == {self.max_norm!r}, must be a finite number > 0.")

    def check(self, n: int) -> None:
        if n < 1:
            raise StrategyError("norm_bound needs at least one update.")

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> RobustResult:
        self.check(deltas.shape[0])
        norms = np.linalg.norm(deltas, axis=1)
        scale = np.minimum(1.0, self.max_norm / np.maximum(norms, np.finfo(np.float64).tiny))
        w = np.asarray(weights, np.float64)
        center = (deltas * (scale * w)[:, None]).sum(axis=0) / w.sum()
        return RobustResult(center, tuple(int(i) for i in np.flatnonzero(scale < 1.0)))


@dataclass(frozen=True)
class CenteredClip:
    """Centered clipping from a trimmed-mean start, with blatant outliers set aside.

    Start from the coordinate-wise trimmed mean (``beta = f / n``); then ``iterations``
    times move the center by the mean of every update's offset from it, each offset
    clipped to ``tau`` (default: the median offset norm, so at most half the updates are
    clipped and no single site moves the center by more than ``tau / n``). Updates whose
    distance to that center is a robust outlier (:func:`outliers`) are flagged and the
    clipping is run again without them. This is the default robust rule: unlike Krum,
    Bulyan and the median it keeps nearly all of FedAvg's accuracy on non-IID data, since
    honest but unusual sites are clipped, not discarded. Needs ``n > 2f``.

    References
    ----------
    Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021 (centered clipping).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0], [1.2], [0.8], [1.1], [0.9], [-400.0]])
    >>> r = CenteredClip(f=1).combine(x, np.ones(6))
    >>> round(float(r.delta[0]), 3), r.flagged
    (1.0, (5,))
    """

    f: int = 1
    tau: float | None = None
    iterations: int = 3
    name: str = "centered_clip"

    def __post_init__(self) -> None:
        _check_f(self.f)
        if self.tau is not None and not (
            isinstance(self.tau, int | float) and math.isfinite(self.tau) and self.tau > 0
        ):
            raise StrategyError(f"tau == {self.tau!r}, must be a finite number > 0 (or omitted: median norm).")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or not 1 <= self.iterations <= 100:
            raise StrategyError(f"iterations == {self.iterations!r}, must be an integer in [1, 100].")

    def check(self, n: int) -> None:
        if n <= 2 * self.f:
            raise StrategyError(
                f"centered_clip with f == {self.f} needs n > 2f = {2 * self.f} updates, got {n}; "
                "lower f or raise min_sites."
            )

    def _clip(self, deltas: np.ndarray) -> np.ndarray:
        n = deltas.shape[0]
        center = TrimmedMean(f=self.f, beta=self.f / n).combine(deltas, np.ones(n)).delta
        for _ in range(self.iterations):
            offset = deltas - center[None, :]
            norms = np.linalg.norm(offset, axis=1)
            tau = self.tau if self.tau is not None else float(np.median(norms))
            if tau <= 0.0:
                break
            scale = np.minimum(1.0, tau / np.maximum(norms, np.finfo(np.float64).tiny))
            center = center + (offset * scale[:, None]).mean(axis=0)
        return center

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> RobustResult:
        n = deltas.shape[0]
        self.check(n)
        center = self._clip(deltas)
        flagged = outliers(deltas, center)
        keep = [i for i in range(n) if i not in set(flagged)]
        if flagged and len(keep) > 2 * self.f:
            center = self._clip(deltas[keep])
        return RobustResult(center, flagged, info={"kept": len(keep)})


DEFAULT_RULE = "centered_clip"

ROBUST_RULES: dict[str, type] = {
    "centered_clip": CenteredClip,
    "krum": Krum,
    "multi_krum": MultiKrum,
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
    "bulyan": Bulyan,
    "norm_bound": NormBound,
}


def make_rule(name: str, options: Mapping[str, Any] | None = None) -> RobustRule:
    """Build a robust rule by name; raises :class:`StrategyError` on an unknown name or
    bad options."""
    if name not in ROBUST_RULES:
        raise StrategyError(f"unknown robust rule {name!r}; choose one of {sorted(ROBUST_RULES)}.")
    opts = dict(options or {})
    for key in ("f", "m", "iterations"):  # JSON and YAML may hand integers over as floats
        if isinstance(opts.get(key), float) and float(opts[key]).is_integer():
            opts[key] = int(opts[key])
    try:
        return ROBUST_RULES[name](**opts)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise StrategyError(f"bad options for robust rule {name!r}: {exc}") from exc
