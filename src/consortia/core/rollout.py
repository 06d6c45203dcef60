"""Progressive delivery plans and their analysis, in the shape of Argo Rollouts / Flagger
canary steps: set a weight (share of the cohort's devices), hold, analyse live signals
against success/failure conditions with a failure limit. Pure: the coordinator feeds
device reports in, gets verdicts out.

A plan (``consortia rollout start MODEL:VERSION --plan canary.yaml``)::

    target: {selector: {device: scanner}}
    steps:
      - set_weight: 25
      - analysis:
          interval_seconds: 10
          samples: 3
          failure_limit: 0
          metrics:
            - {name: error_rate, max: 0.02}
            - {name: latency_p99, max: 0.05}          # seconds
            - {name: prediction_shift, max: 0.2}      # PSI vs the previous release
            - {name: accuracy, min: 0.7}              # on delayed labels (POST /v1/labels)
            - {name: accuracy_drop, max: 0.05}        # baseline accuracy - canary accuracy
      - set_weight: 100

Blue-green is a plan whose only steps are an analysis and ``set_weight: 100``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from consortia.core.drift import psi

__all__ = ["Analysis", "Metric", "RolloutPlan", "Sample", "Step", "evaluate_sample"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metric(_Strict):
    name: Literal["error_rate", "latency_p99", "prediction_shift", "accuracy", "accuracy_drop"]
    max: float | None = Field(default=None, ge=0)
    min: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _bound(self) -> Metric:
        if self.max is None and self.min is None:
            raise ValueError(f"metric {self.name}: give max or min")
        return self


class Analysis(_Strict):
    interval_seconds: float = Field(default=10.0, gt=0, le=3600)
    samples: int = Field(default=3, ge=1, le=100)
    failure_limit: int = Field(default=0, ge=0)
    min_predictions: int = Field(default=20, ge=1, description="canary traffic needed for a conclusive sample")
    min_labels: int = Field(default=20, ge=1, description="delayed labels needed before accuracy is judged")
    metrics: list[Metric] = Field(min_length=1)


class Step(_Strict):
    set_weight: int | None = Field(default=None, ge=1, le=100)
    hold_seconds: float | None = Field(default=None, gt=0, le=7 * 86400)
    analysis: Analysis | None = None

    @model_validator(mode="after")
    def _one(self) -> Step:
        if sum(x is not None for x in (self.set_weight, self.hold_seconds, self.analysis)) != 1:
            raise ValueError("each step is exactly one of set_weight, hold_seconds, analysis")
        return self


class Target(_Strict):
    selector: dict[str, str] = Field(default_factory=dict)
    tenant: str | None = None


class RolloutPlan(_Strict):
    target: Target = Target()
    steps: list[Step] = Field(min_length=1)
    install_timeout_seconds: float = Field(default=300.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _ends_at_full_weight(self) -> RolloutPlan:
        weights = [s.set_weight for s in self.steps if s.set_weight is not None]
        if not weights or weights[-1] != 100:
            raise ValueError("the last set_weight must be 100 (a rollout ends on the whole cohort)")
        if weights != sorted(weights):
            raise ValueError("set_weight must not decrease from step to step")
        return self


@dataclass(frozen=True)
class Sample:
    """One analysis sample: ``verdict`` is pass, fail or inconclusive, with evidence."""

    verdict: str
    values: dict[str, float | None]
    reasons: list[str]
    insufficient: bool = False  # too little canary traffic yet: the driver waits rather than counting it

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "values": self.values, "reasons": self.reasons}


def _sum_hist(reports: list[dict[str, Any]]) -> list[int] | None:
    hists = [r.get("pred_hist") for r in reports if r.get("pred_hist")]
    if not hists:
        return None
    return [sum(col) for col in zip(*hists, strict=True)]


def _accuracy(reports: list[dict[str, Any]], min_labels: int) -> float | None:
    """Accuracy of the decisions whose delayed labels arrived, pooled over devices; None
    below ``min_labels`` labels (too few to judge)."""
    labelled = sum(int(r.get("labelled") or 0) for r in reports)
    if labelled < min_labels:
        return None
    return sum(int(r.get("correct") or 0) for r in reports) / labelled


def evaluate_sample(analysis: Analysis, canary: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> Sample:
    """Judge one sample from the canary devices' reports (signals since they activated
    the new release) and the baseline devices' (still on the previous release)."""
    predictions = sum(int(r.get("predictions") or 0) for r in canary)
    errors = sum(int(r.get("errors") or 0) for r in canary)
    values: dict[str, float | None] = {
        "error_rate": errors / (predictions + errors) if predictions + errors else None,
        "latency_p99": max((r["latency_p99"] for r in canary if r.get("latency_p99") is not None), default=None),
        "prediction_shift": None,
        "accuracy": _accuracy(canary, analysis.min_labels),
        "accuracy_drop": None,
    }
    base_acc = _accuracy(baseline, analysis.min_labels)
    if values["accuracy"] is not None and base_acc is not None:
        values["accuracy_drop"] = base_acc - values["accuracy"]
    cur, ref = _sum_hist(canary), _sum_hist(baseline)
    if cur and ref and min(sum(cur), sum(ref)) >= analysis.min_predictions:
        values["prediction_shift"] = psi(cur, ref)
    reasons: list[str] = []
    if predictions + errors < analysis.min_predictions:
        reason = f"only {predictions + errors} canary requests; need {analysis.min_predictions}"
        return Sample("inconclusive", values, [reason], insufficient=True)
    failed = inconclusive = False
    for m in analysis.metrics:
        v = values[m.name]
        if v is None:
            inconclusive = True
            reasons.append(f"{m.name}: no data")
            continue
        if m.max is not None and v > m.max:
            failed = True
            reasons.append(f"{m.name} = {v:.4g} > {m.max}")
        if m.min is not None and v < m.min:
            failed = True
            reasons.append(f"{m.name} = {v:.4g} < {m.min}")
    verdict = "fail" if failed else ("inconclusive" if inconclusive else "pass")
    return Sample(verdict, values, reasons)
