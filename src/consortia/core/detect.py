"""Calibrated detection on one monitoring window against a reference profile. Pure.

For every feature of a window (a serving agent's aggregates on the release's agreed
bins, possibly coarsened) and the reference (the consortium's training data on the same
bins, see :mod:`consortia.core.profile`):

- ``covariate_drift``: chi-square homogeneity of the window's counts and the reference's
  regrouped the same way; effect: PSI;
- ``missing_spike`` / ``out_of_range``: the rate rose (two-proportion test); effect: the
  rise in rate;

and for the model's output, ``prediction_shift``: the window's prediction histogram
against the reference's test scores (both classes); and when delayed labels arrived,
``performance_drop``: accuracy of the window's labelled decisions against the
reference's test accuracy at the release's threshold (two-proportion test). All p-values of the window go through
Benjamini-Hochberg at ``q``; a finding must also clear a minimum effect, so a very large
window does not flag a shift too small to matter. What this returns are *findings*; an
incident needs them to persist (see the coordinator's monitoring service).

Examples
--------
>>> ref = {"rows": 10000, "features": {"x": {"counts": [2500, 2500, 2500, 2500], "missing": 100}}, "scores": {}}
>>> same = {"rows": 400, "features": {"x": {"counts": [100, 98, 102, 100], "missing": 4}}, "predictions": []}
>>> check_window(same, ref)
[]
>>> moved = {"rows": 400, "features": {"x": {"counts": [10, 40, 100, 250], "missing": 4}}, "predictions": []}
>>> [(f.kind, f.target) for f in check_window(moved, ref)]
[('covariate_drift', 'x')]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from consortia.core.drift import benjamini_hochberg, chi_square, psi, two_proportion
from consortia.core.profile import regroup

__all__ = ["MIN_EFFECT", "Finding", "check_window"]

MIN_EFFECT = {
    "covariate_drift": 0.1,
    "prediction_shift": 0.1,
    "missing_spike": 0.02,
    "out_of_range": 0.02,
    "performance_drop": 0.05,
}


@dataclass(frozen=True)
class Finding:
    """A significant difference between a window and the reference."""

    kind: str
    target: str
    p_value: float
    effect: float
    window_rows: int
    detail: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _grouped(window_counts: list[int], groups: list[int] | None, ref_counts: list[int]) -> list[int]:
    return regroup(ref_counts, groups) if groups is not None else list(ref_counts)


def check_window(
    window: Mapping[str, Any],
    reference: Mapping[str, Any],
    *,
    q: float = 0.01,
    min_effect: Mapping[str, float] = MIN_EFFECT,
    threshold: float = 0.5,
) -> list[Finding]:
    """Findings of ``window`` against ``reference`` (both as JSON dicts), strongest
    evidence first."""
    candidates: list[tuple[str, str, float, float, dict[str, Any]]] = []
    rows = int(window["rows"])
    ref_rows = int(reference["rows"])
    for name, fp in window["features"].items():
        ref = reference["features"].get(name)
        if ref is None:
            continue
        counts = list(fp["counts"])
        base = _grouped(counts, fp.get("groups"), ref["counts"])
        if len(counts) >= 2 and sum(counts) > 0 and sum(base) > 0:
            res = chi_square(counts, base)
            candidates.append(
                ("covariate_drift", name, res.p_value, psi(counts, base), {"counts": counts, "reference": base})
            )
        for kind, key in (("missing_spike", "missing"), ("out_of_range", "out_of_range")):
            cur, old = int(fp.get(key, 0)), int(ref.get(key, 0))
            rise = cur / rows - old / ref_rows if rows and ref_rows else 0.0
            if rise > 0:
                res = two_proportion(cur, rows, old, ref_rows)
                candidates.append(
                    (kind, name, res.p_value, rise, {"rate": cur / rows, "reference_rate": old / ref_rows})
                )
    scores = reference.get("scores") or {}
    preds = list(window.get("predictions") or [])
    if preds and scores:
        ref_scores = [sum(v) for v in zip(*scores.values(), strict=True)]
        base = _grouped(preds, window.get("prediction_groups"), ref_scores)
        if len(preds) >= 2 and sum(preds) > 0 and sum(base) > 0:
            res = chi_square(preds, base)
            candidates.append(
                ("prediction_shift", "predictions", res.p_value, psi(preds, base), {"counts": preds, "reference": base})
            )
    counts = window.get("label_counts") or {}
    labelled, correct = int(counts.get("labelled", 0)), int(counts.get("correct", 0))
    if labelled and scores.get("negative") and scores.get("positive"):
        neg, pos = scores["negative"], scores["positive"]
        cut = int(threshold * len(neg))
        ref_n, ref_correct = sum(neg) + sum(pos), sum(neg[:cut]) + sum(pos[cut:])
        drop = ref_correct / ref_n - correct / labelled if ref_n else 0.0
        if drop > 0:
            res = two_proportion(correct, labelled, ref_correct, ref_n)
            accuracy = {"accuracy": correct / labelled, "reference_accuracy": ref_correct / ref_n, "labelled": labelled}
            candidates.append(("performance_drop", "accuracy", res.p_value, drop, accuracy))
    if not candidates:
        return []
    keep = benjamini_hochberg([c[2] for c in candidates], q)
    found = [
        Finding(kind, target, p, effect, rows, detail)
        for (kind, target, p, effect, detail), k in zip(candidates, keep, strict=True)
        if k and effect >= min_effect.get(kind, 0.0)
    ]
    return sorted(found, key=lambda f: (f.p_value, -f.effect))
