"""Calibrated detection on one monitoring window against a reference profile. Pure.

For every feature of a window (a serving agent's aggregates on the release's agreed
bins, possibly coarsened) and the reference (the consortium's training data on the same
bins, see :mod:`consortia.core.profile`):

- ``covariate_drift``: chi-square homogeneity of the window's counts and the reference's
  on their finest common grouping (both may be coarsened); effect: PSI;
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

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from consortia.core.drift import benjamini_hochberg, chi_square, psi, two_proportion
from consortia.core.profile import common_groups, expand, onto

__all__ = ["LATENCY_FLOOR_MS", "MIN_EFFECT", "Finding", "check_fairness", "check_operations", "check_window"]

MIN_EFFECT = {
    "covariate_drift": 0.1,
    "prediction_shift": 0.1,
    "missing_spike": 0.02,
    "out_of_range": 0.02,
    "performance_drop": 0.05,
    "group_decision_shift": 0.1,  # a group's positive-decision rate moved by 10 points
    "latency_rise": 0.5,  # p99 up by at least half of the device's own baseline
    "error_rise": 0.02,
}
LATENCY_FLOOR_MS = 5.0
"""A latency rise must also add this much to p99: sub-millisecond jitter on a busy host
is not an incident."""


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


def _aligned(
    counts: list[int], groups: list[int] | None, others: list[tuple[list[int], list[int] | None]]
) -> tuple[list[int], list[list[int]]]:
    """The window's counts and each reference histogram on their finest common grouping."""
    bins = len(groups) if groups is not None else len(counts)
    target = common_groups([groups, *(g for _, g in others)], bins)
    return onto(counts, groups, target), [onto(c, g, target) for c, g in others]


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
        counts, (base,) = _aligned(list(fp["counts"]), fp.get("groups"), [(ref["counts"], ref.get("groups"))])
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
    score_groups = reference.get("score_groups") or {}
    if preds and scores:
        preds, parts = _aligned(
            preds, window.get("prediction_groups"), [(v, score_groups.get(k)) for k, v in scores.items()]
        )
        base = [sum(v) for v in zip(*parts, strict=True)]
        if len(preds) >= 2 and sum(preds) > 0 and sum(base) > 0:
            res = chi_square(preds, base)
            candidates.append(
                ("prediction_shift", "predictions", res.p_value, psi(preds, base), {"counts": preds, "reference": base})
            )
    counts = window.get("label_counts") or {}
    labelled, correct = int(counts.get("labelled", 0)), int(counts.get("correct", 0))
    if labelled and scores.get("negative") and scores.get("positive"):
        neg = expand(scores["negative"], score_groups.get("negative"))
        pos = expand(scores["positive"], score_groups.get("positive"))
        cut = int(threshold * len(neg))
        ref_n, ref_correct = round(sum(neg) + sum(pos)), round(sum(neg[:cut]) + sum(pos[cut:]))
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


def check_operations(
    window: Mapping[str, Any], baseline: Sequence[Mapping[str, Any]], *, q: float = 0.01, min_baseline: int = 3
) -> list[Finding]:
    """Infrastructure findings of one device's window against its own earlier windows
    (latencies in seconds, as agents send them): ``latency_rise`` (p99 above every
    baseline window's, up by at least half of their median and by
    :data:`LATENCY_FLOOR_MS`; effect: the relative rise; p-value: the chance that the
    largest of ``len(baseline) + 1`` exchangeable values lands on this window) and
    ``error_rise`` (two-proportion test of the error rate at ``q``; effect: the rise in
    rate). Needs ``min_baseline`` earlier windows.

    >>> calm = [{"rows": 100, "requests": 100, "errors": 0, "latency": {"p99": 0.010}}] * 5
    >>> slow = {"rows": 100, "requests": 100, "errors": 0, "latency": {"p99": 0.030}}
    >>> [(f.kind, round(f.effect, 3)) for f in check_operations(slow, calm)]
    [('latency_rise', 2.0)]
    >>> check_operations({**slow, "latency": {"p99": 0.011}}, calm)
    []
    """
    if len(baseline) < min_baseline:
        return []
    found: list[Finding] = []
    p99 = (window.get("latency") or {}).get("p99")
    past = sorted(float(w["latency"]["p99"]) for w in baseline if (w.get("latency") or {}).get("p99") is not None)
    if p99 is not None and len(past) >= min_baseline:
        median = past[len(past) // 2]
        rise = (float(p99) - median) / median if median > 0 else 0.0
        p_value = 1.0 / (len(past) + 1) if float(p99) > past[-1] else 1.0
        added_ms = 1000.0 * (float(p99) - median)
        if rise >= MIN_EFFECT["latency_rise"] and added_ms >= LATENCY_FLOOR_MS and p_value < 1.0:
            detail = {
                "p99_ms": 1000.0 * float(p99),
                "baseline_median_p99_ms": 1000.0 * median,
                "baseline_windows": len(past),
            }
            found.append(Finding("latency_rise", "latency_p99", p_value, rise, int(window["rows"]), detail))
    errors, requests = int(window.get("errors", 0)), int(window.get("requests", 0)) + int(window.get("errors", 0))
    base_err = sum(int(w.get("errors", 0)) for w in baseline)
    base_req = sum(int(w.get("requests", 0)) + int(w.get("errors", 0)) for w in baseline)
    if requests and base_req:
        rise = errors / requests - base_err / base_req
        if rise >= MIN_EFFECT["error_rise"]:
            res = two_proportion(errors, requests, base_err, base_req)
            if res.p_value < q:
                detail = {"rate": errors / requests, "baseline_rate": base_err / base_req}
                found.append(Finding("error_rise", "errors", res.p_value, rise, int(window["rows"]), detail))
    return found


def check_fairness(
    window: Mapping[str, Any], baseline: Sequence[Mapping[str, Any]], *, q: float = 0.01, min_baseline: int = 3
) -> list[Finding]:
    """``group_decision_shift``: a group of the sensitive attribute whose rate of positive
    decisions in this window differs from the same group's rate in the device's earlier
    windows (two-proportion test per group, Benjamini-Hochberg over the groups, at least
    :data:`MIN_EFFECT` points). A model that starts deciding differently for one group is
    a fairness incident even when the population barely moved. Needs ``min_baseline``
    earlier windows with that group's counts.

    >>> w = lambda a, b: {"rows": 400, "fairness": {"attribute": "sex", "groups": {
    ...     "f": {"rows": 200, "positive": a}, "m": {"rows": 200, "positive": b}}}}
    >>> [(f.kind, f.target) for f in check_fairness(w(20, 60), [w(60, 62)] * 4)]
    [('group_decision_shift', 'sex=f')]
    >>> check_fairness(w(58, 60), [w(60, 62)] * 4)
    []
    """
    fair = window.get("fairness") or {}
    attribute = fair.get("attribute")
    candidates = []
    for group, g in (fair.get("groups") or {}).items():
        if g.get("positive") is None:
            continue
        past = [
            b["fairness"]["groups"][group]
            for b in baseline
            if (b.get("fairness") or {}).get("attribute") == attribute
            and (b["fairness"].get("groups") or {}).get(group, {}).get("positive") is not None
        ]
        if len(past) < min_baseline:
            continue
        base_pos, base_n = sum(int(x["positive"]) for x in past), sum(int(x["rows"]) for x in past)
        rate, base_rate = int(g["positive"]) / int(g["rows"]), base_pos / base_n
        res = two_proportion(int(g["positive"]), int(g["rows"]), base_pos, base_n)
        detail = {"rate": rate, "baseline_rate": base_rate, "rows": int(g["rows"]), "baseline_windows": len(past)}
        candidates.append((f"{attribute}={group}", res.p_value, abs(rate - base_rate), detail))
    if not candidates:
        return []
    keep = benjamini_hochberg([c[1] for c in candidates], q)
    return [
        Finding("group_decision_shift", target, p, effect, int(window["rows"]), detail)
        for (target, p, effect, detail), k in zip(candidates, keep, strict=True)
        if k and effect >= MIN_EFFECT["group_decision_shift"]
    ]
