"""Interventional attribution of a prediction shift, at the serving agent, on its own rows.

When a window's predictions have moved away from the reference (the release's test
scores), the agent asks, for each feature: *if this feature still followed its reference
distribution, how much of the shift would remain?* It re-scores a sample of the window's
own rows with that one feature redrawn from the reference histogram (bin by its reference
frequency, a value uniformly inside the bin; missing at the reference's missing rate;
categories by their reference frequency) and measures the PSI of the new predictions
against the reference. The share of the shift that disappears is the feature's
*recovery*; three independent redraws give its uncertainty. A feature that merely
correlates with the drifted one recovers little (it is redrawn alone; the cause stays in
place). Only these numbers leave the agent, never a row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from consortia.core.drift import chi_square, psi
from consortia.core.profile import common_groups, expand, onto

__all__ = ["MAX_P", "MIN_SHIFT", "attribute", "redraw"]

MIN_SHIFT = 0.1  # PSI of the window's predictions below which there is nothing to explain
MAX_P = 0.01  # ... nor when the shift is within sampling noise (chi-square homogeneity)
MISSING = "<missing>"
OTHER = "<other>"


def redraw(spec: dict[str, Any], profile: dict[str, Any], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` values drawn from a feature's reference profile on its agreed bins, shaped
    ``[n, 1]`` and typed as the release's input (float64 or object)."""
    counts = np.asarray(expand(profile["counts"], profile.get("groups")), dtype=np.float64)
    missing = float(profile.get("missing", 0))
    total = counts.sum() + missing
    if total <= 0:
        raise ValueError("reference profile is empty")
    p_missing = missing / total
    if spec["kind"] == "numeric":
        cuts = [float(c) for c in spec["cuts"]]
        if spec.get("bounds"):
            lo, hi = (float(x) for x in spec["bounds"])
        elif cuts:
            lo, hi = cuts[0] - 1.0, cuts[-1] + 1.0
        else:
            lo, hi = 0.0, 1.0
        edges = [min(lo, cuts[0]), *cuts, max(hi, cuts[-1])] if cuts else [lo, hi]
        b = rng.choice(len(counts), size=n, p=counts / counts.sum())
        values = rng.uniform(np.asarray(edges)[b], np.asarray(edges)[b + 1])
        values[rng.random(n) < p_missing] = math.nan
        return values.reshape(-1, 1)
    vocab = [*spec["vocabulary"], OTHER]
    idx = rng.choice(len(counts), size=n, p=counts / counts.sum())
    out = np.array([vocab[i] for i in idx], dtype=object)
    out[rng.random(n) < p_missing] = MISSING
    return out.reshape(-1, 1)


def _hist(probs: np.ndarray, bins: int) -> np.ndarray:
    idx = np.minimum((np.asarray(probs, dtype=np.float64) * bins).astype(int), bins - 1)
    return np.bincount(np.clip(idx, 0, bins - 1), minlength=bins)


def attribute(
    score: Callable[[dict[str, np.ndarray]], np.ndarray],
    feeds: dict[str, np.ndarray],
    reference: dict[str, Any],
    *,
    draws: int = 3,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Per-feature recovery of the prediction shift of ``feeds`` (the window's sample of
    rows) against ``reference`` (the release's ``reference.json``); None when the
    predictions have not moved (PSI under :data:`MIN_SHIFT`, or a homogeneity p-value of
    at least :data:`MAX_P`)."""
    scores = reference["profile"].get("scores") or {}
    if not scores:
        return None
    groups = reference["profile"].get("score_groups") or {}
    bins = len(next(iter(groups.values()))) if groups else len(next(iter(scores.values())))
    target = common_groups([groups.get(k) for k in scores], bins)
    ref_pred = np.sum([onto(v, groups.get(k), target) for k, v in scores.items()], axis=0)

    def hist(probs: np.ndarray) -> list[int]:
        return onto(_hist(probs, bins).tolist(), None, target)

    current = hist(score(feeds))
    base = psi(current, ref_pred)
    if base < MIN_SHIFT or chi_square(current, ref_pred).p_value >= MAX_P:
        return None  # the predictions have not (detectably) moved: nothing to explain
    n = len(next(iter(feeds.values())))
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for name, spec in reference["bins"].items():
        profile = reference["profile"]["features"].get(name)
        if name not in feeds or profile is None:
            continue
        shares = []
        for _ in range(draws):
            trial = dict(feeds)
            trial[name] = redraw(spec, profile, n, rng)
            shares.append((base - psi(hist(score(trial)), ref_pred)) / base)
        mean = float(np.mean(shares))
        half = 1.96 * float(np.std(shares, ddof=1)) / math.sqrt(draws) if draws > 1 else 0.0
        out[name] = {"recovery": round(mean, 4), "ci": [round(mean - half, 4), round(mean + half, 4)]}
    return {"prediction_psi": round(base, 4), "rows": n, "features": out}
