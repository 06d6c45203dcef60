"""Monitoring windows at a serving agent (site or edge), on the release's agreed bins.

A :class:`WindowMonitor` belongs to one activated release. Every scored request adds its
rows to the current window after the answer has gone out: each feature on the agreed
bins (``reference.json`` in the release: numeric deciles of the consortium's training
data, categorical vocabulary plus "other"), missing and out-of-range counts, the
prediction histogram, latency and errors; delayed labels add the row's score to a
per-class score histogram (performance: AUC and accuracy, calibration). A window closes
after ``max_rows`` rows or ``max_seconds``; a closed window is coarsened (bins under
``min_count`` merged with their neighbours, :func:`~consortia.core.profile.coarsen`,
with the grouping reported so the reference can be compared on the same groups; missing,
out-of-range and label counts under the minimum zeroed) and queued for the coordinator as a
:class:`~consortia.protocol.delivery.MonitoringWindow`. Raw values and identifiers never
enter a window.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from consortia.core.profile import categorical_histogram, coarsen, numeric_histogram, suppress
from consortia.edge.attribution import attribute

__all__ = ["PRED_BINS", "WindowMonitor", "load_bins", "load_reference"]

PRED_BINS = 10
MISSING = "<missing>"  # as consortia.edge.runtime.MISSING (kept import-light)


def load_reference(release: Any) -> dict[str, Any] | None:
    """A release's monitoring reference, if it has one: ``{"bins", "sites", "profile"}``
    from ``bins.json`` and ``reference.json``, with the model's test-score histograms
    (``profile.scores``) from the manifest."""
    files = {
        p["role"]: release.path / p["path"] for p in release.manifest["parts"] if p["role"] in ("bins", "reference")
    }
    if len(files) < 2:
        return None
    ref = json.loads(files["reference"].read_text())
    profile = {
        **ref["profile"],
        "scores": release.manifest.get("reference_scores") or {},
        "score_groups": release.manifest.get("reference_score_groups") or {},
    }
    return {"bins": json.loads(files["bins"].read_text())["bins"], "sites": ref.get("sites", []), "profile": profile}


def load_bins(release: Any) -> dict[str, dict[str, Any]]:
    """The agreed monitoring bins of a release ({} if it has none)."""
    ref = load_reference(release)
    return ref["bins"] if ref else {}


def _hist(probs: np.ndarray) -> np.ndarray:
    idx = np.minimum((np.asarray(probs, dtype=np.float64) * PRED_BINS).astype(int), PRED_BINS - 1)
    return np.bincount(np.clip(idx, 0, PRED_BINS - 1), minlength=PRED_BINS)


@dataclass
class _Feature:
    counts: np.ndarray
    missing: int = 0
    out_of_range: int = 0


@dataclass
class WindowMonitor:
    """One release's current window and the closed windows waiting to be sent."""

    release: str
    bins: dict[str, dict[str, Any]]
    min_count: int = 10
    max_rows: int = 1000
    max_seconds: float = 60.0
    closed: list[dict[str, Any]] = field(default_factory=list)
    max_closed: int = 1000  # offline: keep the newest windows, drop the oldest
    scorer: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None  # the release, for attribution
    reference: dict[str, Any] | None = None  # the release's reference.json
    sample_rows: int = 400  # rows kept (locally, in memory) per window for attribution
    sensitive: str | None = None  # the declared sensitive attribute (a model input): per-group aggregates
    threshold: float = 0.5  # the release's decision threshold (positive decisions per group)
    max_groups: int = 50  # more distinct values than this pool into "<other>"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._plan = {
            name: (
                b["kind"],
                [float(c) for c in b.get("cuts", [])],
                tuple(b["bounds"]) if b.get("bounds") else None,
                {str(v): i for i, v in enumerate(b.get("vocabulary", []))},
            )
            for name, b in self.bins.items()
        }
        self._open(datetime.now(UTC))

    def _open(self, now: datetime) -> None:
        self.started = now
        self.rows = self.requests = self.errors = 0
        self.features = {
            name: _Feature(np.zeros(len(b["cuts"]) + 1 if b["kind"] == "numeric" else len(b["vocabulary"]) + 1, int))
            for name, b in self.bins.items()
        }
        self.predictions = np.zeros(PRED_BINS, int)
        self.labelled = {"negative": np.zeros(PRED_BINS, int), "positive": np.zeros(PRED_BINS, int)}
        self.label_counts = [0, 0]  # labelled rows, correct decisions
        self.latencies: list[float] = []
        self._sample: dict[str, list[Any]] = {name: [] for name in self.bins}
        self._sampled = 0
        self.groups: dict[str, list[int]] = {}  # sensitive attribute's group -> [rows, positive decisions]

    # ------------------------------------------------------------------ recording

    def observe(self, feeds: dict[str, np.ndarray], probs: np.ndarray, seconds: float) -> None:
        """Add one scored request (``feeds`` as the release's typed inputs)."""
        n = len(probs)
        with self._lock:
            if self.scorer is not None and self._sampled < self.sample_rows:
                take = min(n, self.sample_rows - self._sampled)
                for name in self.bins:
                    values = feeds.get(name)
                    if values is not None:
                        self._sample[name].extend(values.ravel()[:take].tolist())
                self._sampled += take
            if n <= 16:  # a serving loop's usual request: plain Python beats numpy's per-call overhead
                self._observe_small(feeds, n)
            else:
                self._observe_batch(feeds)
            self.predictions += _hist(probs)
            if self.sensitive is not None and self.sensitive in feeds:
                self._observe_groups(feeds[self.sensitive].ravel()[:n].tolist(), probs)
            self.rows += n
            self.requests += 1
            self.latencies.append(seconds)
            self._close_if_due(datetime.now(UTC))

    def _observe_small(self, feeds: dict[str, np.ndarray], n: int) -> None:
        for name, (kind, cuts, bounds, index) in self._plan.items():
            values = feeds.get(name)
            if values is None:
                continue
            f = self.features[name]
            flat = values.ravel().tolist()
            for v in flat[:n]:
                if kind == "numeric":
                    if v != v or v in (math.inf, -math.inf):  # NaN or infinite: missing
                        f.missing += 1
                        continue
                    f.counts[bisect.bisect_left(cuts, v)] += 1
                    if bounds is not None and (v < bounds[0] or v > bounds[1]):
                        f.out_of_range += 1
                elif v is None or v == MISSING:
                    f.missing += 1
                else:
                    i = index.get(v, len(index))
                    f.counts[i] += 1
                    if i == len(index):
                        f.out_of_range += 1

    def _observe_batch(self, feeds: dict[str, np.ndarray]) -> None:
        for name, b in self.bins.items():
            values = feeds.get(name)
            if values is None:
                continue
            f = self.features[name]
            if b["kind"] == "numeric":
                bounds = tuple(b["bounds"]) if b.get("bounds") else None
                counts, missing, oor = numeric_histogram(values.ravel(), b["cuts"], bounds)  # type: ignore[arg-type]
            else:
                counts, missing = categorical_histogram(values.ravel().tolist(), b["vocabulary"], MISSING)
                oor = counts[-1]
            f.counts += counts
            f.missing += missing
            f.out_of_range += oor

    def _group(self, v: Any) -> str:
        b = self.bins.get(self.sensitive or "")
        if v is None or v == MISSING or (isinstance(v, float) and v != v):
            return MISSING
        if b is not None and b["kind"] == "numeric":  # a numeric attribute groups by its agreed bins
            return f"bin {bisect.bisect_left(b['cuts'], float(v))}"
        return str(v)

    def _observe_groups(self, values: list[Any], probs: np.ndarray) -> None:
        for v, p in zip(values, np.asarray(probs).tolist(), strict=False):
            g = self._group(v)
            if g not in self.groups and len(self.groups) >= self.max_groups:
                g = "<other>"
            counts = self.groups.setdefault(g, [0, 0])
            counts[0] += 1
            counts[1] += int(p >= self.threshold)

    def _fairness(self) -> dict[str, Any] | None:
        """Rows and positive decisions per group of the sensitive attribute: groups under
        the minimum count are left out (their rows counted as suppressed); a group's
        positive count is given only if it and its negatives are each 0 or at least the
        minimum (else None)."""
        if self.sensitive is None or not self.groups:
            return None
        m, groups, dropped = self.min_count, {}, 0
        for g, (rows, positive) in sorted(self.groups.items()):
            if rows < m:
                dropped += rows
                continue
            ok = all(c == 0 or c >= m for c in (positive, rows - positive))
            groups[g] = {"rows": rows, "positive": positive if ok else None}
        return {"attribute": self.sensitive, "threshold": self.threshold, "groups": groups, "suppressed": dropped}

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def label(self, probability: float, positive: bool, correct: bool) -> None:
        """A delayed label for a row this release scored (``correct``: its decision matched)."""
        with self._lock:
            self.labelled["positive" if positive else "negative"] += _hist(np.array([probability]))
            self.label_counts[0] += 1
            self.label_counts[1] += int(correct)

    def tick(self) -> None:
        """Close the window if its time is up (called from the agent's loop)."""
        with self._lock:
            self._close_if_due(datetime.now(UTC))

    def flush(self) -> None:
        """Close the current window now if it holds anything (e.g. before a release swap)."""
        with self._lock:
            if self.requests or self.errors or self._any_labels():
                self._close(datetime.now(UTC))

    def drain(self) -> list[dict[str, Any]]:
        with self._lock:
            out, self.closed = self.closed, []
            return out

    def requeue(self, windows: list[dict[str, Any]]) -> None:
        """Put back windows that could not be sent (oldest first, bounded)."""
        with self._lock:
            self.closed = (windows + self.closed)[-self.max_closed :]

    # ------------------------------------------------------------------ closing

    def _any_labels(self) -> bool:
        return bool(self.labelled["negative"].sum() or self.labelled["positive"].sum())

    def _close_if_due(self, now: datetime) -> None:
        age = (now - self.started).total_seconds()
        if self.rows >= self.max_rows or (age >= self.max_seconds and (self.requests or self.errors)):
            self._close(now)

    def _attribution(self) -> dict[str, Any] | None:
        """Interventional recovery per feature of the window's prediction shift (see
        :mod:`consortia.edge.attribution`), from the rows sampled in this window."""
        if self.scorer is None or self.reference is None or self._sampled < 5 * self.min_count:
            return None
        feeds = {}
        for name, spec in self.bins.items():
            values = self._sample.get(name) or []
            if len(values) != self._sampled:
                return None
            kind = np.float64 if spec["kind"] == "numeric" else object
            feeds[name] = np.asarray(values, dtype=kind).reshape(-1, 1)
        try:
            return attribute(self.scorer, feeds, self.reference, seed=self.rows)
        except Exception:  # attribution is evidence, never a reason to lose the window
            return None

    def _close(self, now: datetime) -> None:
        m = self.min_count
        features = {}
        for name, f in self.features.items():
            ordered = self.bins[name]["kind"] == "numeric"
            counts, groups, dropped = coarsen(f.counts.tolist(), m, ordered=ordered)
            (missing,), d_missing = suppress([f.missing], m)
            (oor,), _ = suppress([f.out_of_range], m)
            features[name] = {
                "counts": counts,
                "groups": groups,
                "missing": missing,
                "out_of_range": oor,
                "suppressed": dropped + d_missing,
            }
        predictions, prediction_groups, _ = coarsen(self.predictions.tolist(), m, ordered=True)
        lat = np.asarray(self.latencies) if self.latencies else None
        window = {
            "release": self.release,
            "started_at": self.started.isoformat(),
            "ended_at": now.isoformat(),
            "rows": self.rows,
            "requests": self.requests,
            "errors": self.errors,
            "features": features,
            "predictions": predictions,
            "prediction_groups": prediction_groups,
            "latency": {
                "count": len(self.latencies),
                **{
                    k: (float(np.quantile(lat, q)) if lat is not None else None)
                    for k, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
                },
            },
            "labelled": {k: suppress(v.tolist(), m)[0] for k, v in self.labelled.items()} if self._any_labels() else {},
            "attribution": self._attribution(),
            "fairness": self._fairness(),
            "label_counts": {
                "labelled": suppress([self.label_counts[0]], m)[0][0],
                "correct": suppress([self.label_counts[1]], m)[0][0],
            },
            "min_count": m,
        }
        self.closed = (self.closed + [window])[-self.max_closed :]
        self._open(now)
