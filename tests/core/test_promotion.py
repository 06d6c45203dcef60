"""Promotion policy evaluation: each rule's pass/fail and evidence, exactly."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from consortia.core.promotion import Facts, PromotionPolicy, StagePolicy, evaluate


def facts(**kw) -> Facts:
    base = dict(
        stage="staging",
        pooled={"auc": 0.76, "accuracy": 0.9},
        per_tenant={"a": {"auc": 0.8}, "b": {"auc": 0.6}, "c": {"auc": 0.5}},
        contributors=["a", "b", "c"],
        regulated={"a", "b"},
        fairness={"auc_gap": 0.08, "groups": {"f": {}, "m": {}}},
        production_pooled={"auc": 0.78, "accuracy": 0.9},
        epsilon_spent=None,
        signed=True,
        approvals={"a": "approve"},
    )
    return Facts(**{**base, **kw})


def run(to: str, doc: dict, **kw) -> list[tuple[str, bool, str]]:
    return [(r.rule, r.passed, r.evidence) for r in evaluate(to, StagePolicy.model_validate(doc), facts(**kw))]


def test_every_rule_with_its_evidence():
    out = run(
        "production",
        {
            "rules": [
                {"rule": "pooled_metric", "metric": "auc", "min": 0.75},
                {"rule": "tenant_metric", "metric": "auc", "min": 0.55, "tenants": "regulated"},
                {"rule": "tenant_metric", "metric": "auc", "min": 0.55},
                {"rule": "non_regression", "metric": "auc", "max_drop": 0.01},
                {"rule": "fairness_gap", "metric": "auc_gap", "max": 0.1},
                {"rule": "coverage", "min_tenants": 4},
                {"rule": "epsilon_budget", "max": 3},
                {"rule": "signed"},
            ],
            "approvals": {"quorum": "every_regulated"},
        },
    )
    assert out == [
        ("current stage is staging", True, "current stage is staging"),
        ("pooled auc >= 0.75", True, "pooled auc = 0.7600"),
        ("auc >= 0.55 for every regulated tenant", True, "a 0.8000, b 0.6000"),
        ("auc >= 0.55 for every tenant", False, "a 0.8000, b 0.6000, c 0.5000; below: c"),
        ("no auc regression over 0.01 vs production", False, "this version 0.7600, production 0.7800"),
        ("auc_gap <= 0.1", True, "auc_gap = 0.0800 over f, m"),
        ("data from >= 4 tenants", False, "3 tenant(s): a, b, c"),
        ("epsilon spent <= 3.0", False, "the job used no differential privacy (epsilon is unbounded)"),
        ("release signed", True, "signed release manifest present"),
        ("approval of every regulated tenant", False, "approved by: a; missing approvals from: b"),
    ]


def test_quorums_and_rejections():
    assert run("production", {"approvals": {"quorum": "k_of_n", "k": 1}})[-1][1] is True
    k2 = run("production", {"approvals": {"quorum": "k_of_n", "k": 2}})[-1]
    assert k2 == ("approval of 2 of 3 tenants", False, "1 of 3 contributing tenants approved (a)")
    rejected = run("production", {"approvals": {"quorum": "tenants", "tenants": ["a"]}}, approvals={"a": "reject"})[-1]
    assert rejected == ("approval of a", False, "approved by: nobody; missing approvals from: a; rejected by: a")
    # a later stage needs the earlier one first; no fairness measured fails a fairness rule
    first = run("production", {"rules": [{"rule": "fairness_gap", "max": 0.1}]}, stage="candidate", fairness=None)
    assert first[0] == ("current stage is staging", False, "current stage is candidate")
    assert first[1][1] is False and "not measured" in first[1][2]
    assert run("production", {"rules": [{"rule": "non_regression"}]}, production_pooled=None)[1] == (
        "no auc regression over 0.0 vs production",
        True,
        "no production version yet; this version 0.7600",
    )


def test_policy_documents_are_validated():
    with pytest.raises(ValidationError, match="quorum tenants needs a non-empty tenants list"):
        PromotionPolicy.model_validate({"model": "m", "stages": {"staging": {"approvals": {"quorum": "tenants"}}}})
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        PromotionPolicy.model_validate({"model": "m", "stages": {"staging": {"rules": [{"rule": "vibes"}]}}})
    with pytest.raises(ValidationError):
        PromotionPolicy.model_validate({"model": "m", "stages": {"qa": {}}})
