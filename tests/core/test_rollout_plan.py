"""Rollout plans and canary analysis: validation and verdicts, exactly."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from consortia.core.drift import psi
from consortia.core.rollout import Analysis, RolloutPlan, evaluate_sample

ANALYSIS = Analysis.model_validate(
    {
        "min_predictions": 20,
        "metrics": [
            {"name": "error_rate", "max": 0.05},
            {"name": "latency_p99", "max": 0.01},
            {"name": "prediction_shift", "max": 0.2},
        ],
    }
)


def report(pred=100, errors=0, p99=0.002, hist=(50, 30, 20, 0)):
    return {"predictions": pred, "errors": errors, "latency_p99": p99, "pred_hist": list(hist)}


def test_psi_is_zero_for_equal_and_grows_with_shift():
    assert psi([50, 30, 20], [50, 30, 20]) == pytest.approx(0.0)
    assert 0 < psi([45, 35, 20], [50, 30, 20]) < psi([10, 10, 80], [50, 30, 20])
    with pytest.raises(ValueError, match="same >= 2 bins"):
        psi([1, 2], [1, 2, 3])


def test_verdicts_pass_fail_and_inconclusive():
    base = [report()]
    assert evaluate_sample(ANALYSIS, [report()], base).verdict == "pass"
    bad = evaluate_sample(ANALYSIS, [report(errors=10)], base)
    assert bad.verdict == "fail" and bad.reasons == ["error_rate = 0.09091 > 0.05"]
    slow = evaluate_sample(ANALYSIS, [report(), report(p99=0.03)], base)
    assert slow.verdict == "fail" and slow.reasons == ["latency_p99 = 0.03 > 0.01"]
    shifted = evaluate_sample(ANALYSIS, [report(hist=(0, 0, 10, 90))], base)
    assert shifted.verdict == "fail" and shifted.reasons[0].startswith("prediction_shift = ")
    quiet = evaluate_sample(ANALYSIS, [report(pred=5, hist=(5, 0, 0, 0))], base)
    assert quiet.verdict == "inconclusive" and quiet.insufficient and quiet.values["prediction_shift"] is None
    no_baseline = evaluate_sample(ANALYSIS, [report()], [])
    assert no_baseline.verdict == "inconclusive" and no_baseline.reasons == ["prediction_shift: no data"]


def test_plans_are_validated():
    ok = RolloutPlan.model_validate({"steps": [{"set_weight": 20}, {"hold_seconds": 5}, {"set_weight": 100}]})
    assert len(ok.steps) == 3
    for steps, msg in (
        ([{"set_weight": 50}], "last set_weight must be 100"),
        ([{"set_weight": 60}, {"set_weight": 20}, {"set_weight": 100}], "must not decrease"),
        ([{"set_weight": 50, "hold_seconds": 3}, {"set_weight": 100}], "exactly one of"),
        ([{"analysis": {"metrics": [{"name": "error_rate"}]}}, {"set_weight": 100}], "give max or min"),
    ):
        with pytest.raises(ValidationError, match=msg):
            RolloutPlan.model_validate({"steps": steps})


def test_accuracy_on_delayed_labels_is_judged_only_with_enough_labels():
    analysis = Analysis.model_validate(
        {"min_labels": 50, "metrics": [{"name": "accuracy", "min": 0.8}, {"name": "accuracy_drop", "max": 0.05}]}
    )
    base = [{**report(), "labelled": 200, "correct": 180}]  # baseline 0.90
    good = evaluate_sample(analysis, [{**report(), "labelled": 100, "correct": 88}], base)
    assert good.verdict == "pass" and good.values["accuracy"] == pytest.approx(0.88)
    assert good.values["accuracy_drop"] == pytest.approx(0.02)
    worse = evaluate_sample(analysis, [{**report(), "labelled": 60, "correct": 30}, {**report(), "labelled": 40}], base)
    assert worse.verdict == "fail" and worse.values["accuracy"] == pytest.approx(0.30)
    assert worse.reasons == ["accuracy = 0.3 < 0.8", "accuracy_drop = 0.6 > 0.05"]
    few = evaluate_sample(analysis, [{**report(), "labelled": 49, "correct": 49}], base)
    assert few.verdict == "inconclusive" and few.reasons == ["accuracy: no data", "accuracy_drop: no data"]
