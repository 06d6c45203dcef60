"""Promotion policy as code: the policy document and its pure evaluation.

A policy (YAML, applied with ``consortia policy apply FILE``) names, per target stage, the
rules a model version must pass and the approval quorum it needs::

    model: credit-risk
    stages:
      staging:
        rules:
          - {rule: pooled_metric, metric: auc, min: 0.70}
          - {rule: coverage, min_tenants: 3}
          - {rule: signed}
      production:
        requires_stage: staging
        rules:
          - {rule: tenant_metric, metric: auc, min: 0.60, tenants: regulated}
          - {rule: non_regression, metric: auc, max_drop: 0.01}
        approvals: {quorum: every_regulated}

:func:`evaluate` turns a policy stage and the version's :class:`Facts` into one
:class:`RuleResult` per rule (pass/fail and its evidence). No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ORDER", "Facts", "PromotionPolicy", "RuleResult", "StagePolicy", "evaluate"]

ORDER = ("candidate", "staging", "production")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PooledMetric(_Strict):
    rule: Literal["pooled_metric"]
    metric: Literal["auc", "accuracy"]
    min: float = Field(ge=0, le=1)


class TenantMetric(_Strict):
    rule: Literal["tenant_metric"]
    metric: Literal["auc", "accuracy"]
    min: float = Field(ge=0, le=1)
    tenants: Literal["every", "regulated"] = "every"


class NonRegression(_Strict):
    rule: Literal["non_regression"]
    metric: Literal["auc", "accuracy"] = "auc"
    max_drop: float = Field(default=0.0, ge=0, le=1)


class FairnessGap(_Strict):
    rule: Literal["fairness_gap"]
    metric: Literal["auc_gap", "demographic_parity_gap", "equal_opportunity_gap"] = "auc_gap"
    max: float = Field(ge=0, le=1)


class Coverage(_Strict):
    rule: Literal["coverage"]
    min_tenants: int = Field(ge=1)


class EpsilonBudget(_Strict):
    rule: Literal["epsilon_budget"]
    max: float = Field(gt=0)


class Signed(_Strict):
    rule: Literal["signed"]


Rule = Annotated[
    PooledMetric | TenantMetric | NonRegression | FairnessGap | Coverage | EpsilonBudget | Signed,
    Field(discriminator="rule"),
]


class Quorum(_Strict):
    """Who must approve: nobody, every regulated contributing tenant, k of the
    contributing tenants, or a named list of tenants."""

    quorum: Literal["none", "every_regulated", "k_of_n", "tenants"] = "none"
    k: int | None = Field(default=None, ge=1)
    tenants: list[str] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Quorum:
        if self.quorum == "k_of_n" and self.k is None:
            raise ValueError("quorum k_of_n needs k")
        if self.quorum == "tenants" and not self.tenants:
            raise ValueError("quorum tenants needs a non-empty tenants list")
        return self


class StagePolicy(_Strict):
    requires_stage: Literal["candidate", "staging", "production"] | None = None
    rules: list[Rule] = Field(default_factory=list)
    approvals: Quorum = Quorum()


class PromotionPolicy(_Strict):
    model: str = Field(min_length=1, max_length=63)
    stages: dict[Literal["staging", "production"], StagePolicy] = Field(min_length=1)


@dataclass(frozen=True)
class Facts:
    """What a policy is evaluated against, gathered by the coordinator."""

    stage: str
    pooled: dict[str, float | None]
    per_tenant: dict[str, dict[str, Any]]
    contributors: list[str]
    regulated: set[str]
    fairness: dict[str, Any] | None
    production_pooled: dict[str, float | None] | None
    epsilon_spent: float | None
    signed: bool
    approvals: dict[str, str] = field(default_factory=dict)  # tenant -> latest decision for this stage


@dataclass(frozen=True)
class RuleResult:
    rule: str
    passed: bool
    evidence: str

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "passed": self.passed, "evidence": self.evidence}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _one(rule: Any, f: Facts) -> RuleResult:
    if isinstance(rule, PooledMetric):
        v = f.pooled.get(rule.metric)
        ok = v is not None and v >= rule.min
        return RuleResult(f"pooled {rule.metric} >= {rule.min}", ok, f"pooled {rule.metric} = {_fmt(v)}")
    if isinstance(rule, TenantMetric):
        scope = [t for t in f.contributors if rule.tenants == "every" or t in f.regulated]
        vals = {t: (f.per_tenant.get(t) or {}).get(rule.metric) for t in scope}
        bad = sorted(t for t, v in vals.items() if v is None or v < rule.min)
        ev = ", ".join(f"{t} {_fmt(v)}" for t, v in sorted(vals.items())) or "no tenant in scope"
        name = f"{rule.metric} >= {rule.min} for {'every' if rule.tenants == 'every' else 'every regulated'} tenant"
        return RuleResult(name, bool(scope) and not bad, ev + (f"; below: {', '.join(bad)}" if bad else ""))
    if isinstance(rule, NonRegression):
        name = f"no {rule.metric} regression over {rule.max_drop} vs production"
        v = f.pooled.get(rule.metric)
        if f.production_pooled is None:
            return RuleResult(name, v is not None, f"no production version yet; this version {_fmt(v)}")
        prod = f.production_pooled.get(rule.metric)
        ok = v is not None and (prod is None or v >= prod - rule.max_drop)
        return RuleResult(name, ok, f"this version {_fmt(v)}, production {_fmt(prod)}")
    if isinstance(rule, FairnessGap):
        name = f"{rule.metric} <= {rule.max}"
        if not f.fairness:
            return RuleResult(name, False, "fairness was not measured (declare card.sensitive_attribute in the job)")
        gap = f.fairness.get(rule.metric)
        groups = ", ".join(sorted(f.fairness.get("groups", {})))
        return RuleResult(name, gap is not None and gap <= rule.max, f"{rule.metric} = {_fmt(gap)} over {groups}")
    if isinstance(rule, Coverage):
        n = len(f.contributors)
        return RuleResult(
            f"data from >= {rule.min_tenants} tenants",
            n >= rule.min_tenants,
            f"{n} tenant(s): {', '.join(f.contributors)}",
        )
    if isinstance(rule, EpsilonBudget):
        name = f"epsilon spent <= {rule.max}"
        if f.epsilon_spent is None:
            return RuleResult(name, False, "the job used no differential privacy (epsilon is unbounded)")
        return RuleResult(name, f.epsilon_spent <= rule.max, f"epsilon spent = {f.epsilon_spent:.4f}")
    if isinstance(rule, Signed):
        return RuleResult(
            "release signed",
            f.signed,
            "signed release manifest present" if f.signed else "no signed release for this version",
        )
    raise TypeError(f"unknown rule {rule!r}")  # pragma: no cover - the union is closed


def _quorum(q: Quorum, f: Facts) -> RuleResult | None:
    if q.quorum == "none":
        return None
    approved = {t for t, d in f.approvals.items() if d == "approve"}
    rejected = sorted(t for t, d in f.approvals.items() if d == "reject")
    if q.quorum in ("every_regulated", "tenants"):
        required = (
            sorted(t for t in f.contributors if t in f.regulated)
            if q.quorum == "every_regulated"
            else sorted(q.tenants or [])
        )
        missing = [t for t in required if t not in approved]
        name = (
            "approval of every regulated tenant"
            if q.quorum == "every_regulated"
            else "approval of " + ", ".join(required)
        )
        ev = f"approved by: {', '.join(sorted(approved & set(required))) or 'nobody'}"
        if missing:
            ev += f"; missing approvals from: {', '.join(missing)}"
        if rejected:
            ev += f"; rejected by: {', '.join(rejected)}"
        return RuleResult(name, not missing and not (set(rejected) & set(required)), ev)
    k = int(q.k or 1)
    got = sorted(approved & set(f.contributors))
    ev = f"{len(got)} of {len(f.contributors)} contributing tenants approved ({', '.join(got) or 'none'})"
    if rejected:
        ev += f"; rejected by: {', '.join(rejected)}"
    return RuleResult(f"approval of {k} of {len(f.contributors)} tenants", len(got) >= k and not rejected, ev)


def evaluate(stage: str, policy: StagePolicy, facts: Facts) -> list[RuleResult]:
    """Every rule of ``policy`` for moving a version in ``facts.stage`` to ``stage``."""
    required = policy.requires_stage or ORDER[max(ORDER.index(stage) - 1, 0)]
    out = [RuleResult(f"current stage is {required}", facts.stage == required, f"current stage is {facts.stage}")]
    out += [_one(r, facts) for r in policy.rules]
    q = _quorum(policy.approvals, facts)
    if q is not None:
        out.append(q)
    return out
