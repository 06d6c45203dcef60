"""The site's local monitor: reference profiles of its own data on the agreed bins.

When a job ends (its evaluate task) a site profiles its training split on the bin edges
agreed at round 0 (numeric: the consortium's deciles; categorical: the agreed vocabulary
plus one bin for anything else), with missing and out-of-range counts, and the final
model's score histograms per class on its test split. It keeps the full-resolution
profile in ``HOME/references/job-<id>.json`` (its own reference, for comparing its own
traffic later) and sends a copy coarsened so every count is at least its minimum count
(:func:`suppressed`); the coordinator sums those on their common grouping into the
global reference that ships inside the release.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from consortia.core.profile import categorical_histogram, coarsen, numeric_histogram, suppress
from consortia.ml.data import MISSING
from consortia.protocol.schemas import FeatureProfile, JobSpec, PreprocessingPlan, ReferenceProfile

__all__ = ["SCORE_BINS", "build_reference", "feature_profile", "score_histogram", "suppressed", "write_reference"]

SCORE_BINS = 10  # as the serving agents' prediction histograms (consortia.edge.serving.PRED_BINS)


def feature_profile(values: pd.Series, name: str, plan: PreprocessingPlan) -> FeatureProfile:
    """One column on its agreed bins."""
    if name in plan.numeric:
        x = pd.to_numeric(values, errors="coerce").astype("float64").to_numpy()
        counts, missing, oor = numeric_histogram(x, plan.cuts.get(name, []), plan.bounds.get(name))
        return FeatureProfile(counts=counts, missing=missing, out_of_range=oor)
    vocab = plan.categorical[name]
    counts, missing = categorical_histogram(values.astype("string").fillna(MISSING).tolist(), vocab, MISSING)
    return FeatureProfile(counts=counts, missing=missing, out_of_range=counts[-1])


def score_histogram(scores: np.ndarray) -> list[int]:
    idx = np.minimum((np.asarray(scores, dtype=np.float64) * SCORE_BINS).astype(int), SCORE_BINS - 1)
    return [int(c) for c in np.bincount(np.clip(idx, 0, SCORE_BINS - 1), minlength=SCORE_BINS)]


def build_reference(
    train: pd.DataFrame, spec: JobSpec, plan: PreprocessingPlan, test_scores: np.ndarray, test_y: np.ndarray
) -> ReferenceProfile:
    """The full-resolution reference of this site (kept locally)."""
    features = {f.name: feature_profile(train[f.name], f.name, plan) for f in spec.features}
    y = np.asarray(test_y) > 0.5
    scores = {"negative": score_histogram(test_scores[~y]), "positive": score_histogram(test_scores[y])}
    return ReferenceProfile(rows=len(train), features=features, scores=scores)


def suppressed(ref: ReferenceProfile, min_count: int, plan: PreprocessingPlan) -> ReferenceProfile:
    """What may leave the site: every histogram coarsened so that each reported count is
    0 or at least ``min_count`` (:func:`consortia.core.profile.coarsen`: adjacent bins
    merged for numeric features and scores, small categories pooled), missing and
    out-of-range counts under the minimum zeroed. Zeroing the bins instead would bias the
    reference (its tails would vanish) and make ordinary traffic look drifted."""
    features = {}
    for name, fp in ref.features.items():
        counts, groups, dropped = coarsen(fp.counts, min_count, ordered=name in plan.numeric)
        (missing,), d_missing = suppress([fp.missing], min_count)
        (oor,), _ = suppress([fp.out_of_range], min_count)  # a subset of the bins: counted there
        features[name] = FeatureProfile(
            counts=counts,
            groups=None if groups == list(range(len(fp.counts))) else groups,
            missing=missing,
            out_of_range=oor,
            suppressed=fp.suppressed + dropped + d_missing,
        )
    scores, score_groups = {}, {}
    for cls, hist in ref.scores.items():
        counts, groups, _ = coarsen(hist, min_count, ordered=True)
        scores[cls] = counts
        if groups != list(range(len(hist))):
            score_groups[cls] = groups
    return ReferenceProfile(rows=ref.rows, features=features, scores=scores, score_groups=score_groups)


def write_reference(home: Path, job_id: int, ref: ReferenceProfile, params_hash: str | None = None) -> Path:
    """Keep the site's own reference (full resolution) under ``HOME/references``: as
    ``job-<id>.json`` and, given the final model's parameters hash, as
    ``by-params/<hash>.json``, where the site's serving endpoint finds it for the release
    of that model (its attribution then compares with the site's own population)."""
    body = json.dumps(ref.model_dump(mode="json"), sort_keys=True)
    paths = [home / "references" / f"job-{job_id}.json"]
    if params_hash is not None:
        paths.append(home / "references" / "by-params" / f"{params_hash}.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(body)
        tmp.replace(path)
    return paths[0]
