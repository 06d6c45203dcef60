"""Release against infrastructure by difference-in-differences: a release that merely
coincides with a fleet-wide latency rise gets (almost) none of it; a release that causes
the rise on its canaries gets it all; plus the ranking and summary of causes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from consortia.core.rca import rank_causes, release_vs_infrastructure, summarize

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
SWITCH = (T0 + timedelta(minutes=30)).isoformat()


def fleet(seed: int, *, common: float, release: float) -> list[dict]:
    """12 devices, windows every minute for an hour; 4 canaries get m:2 at minute 30.
    Latency p99 (ms): a per-device base, noise, ``common`` added to every device after the
    switch, ``release`` added to the canaries' windows on m:2."""
    rng = np.random.default_rng(seed)
    out, wid = [], 0
    for d in range(12):
        base = rng.uniform(8, 12)
        for minute in range(60):
            after = minute >= 30
            canary = d < 4
            rel = "m:2" if (canary and after) else "m:1"
            p99 = base + rng.normal(0, 0.8) + (common if after else 0.0) + (release if rel == "m:2" else 0.0)
            wid += 1
            out.append(
                {
                    "id": wid,
                    "device": f"dev-{d}",
                    "release": rel,
                    "ended_at": (T0 + timedelta(minutes=minute, seconds=59)).isoformat(),
                    "latency_p99": p99,
                }
            )
    return out


@pytest.mark.parametrize("seed", range(5))
def test_a_release_that_coincides_with_a_fleet_wide_rise_gets_under_10_percent(seed):
    causes = release_vs_infrastructure(fleet(seed, common=20.0, release=0.0), "latency_p99", "m:2", SWITCH)
    by = {c["kind"]: c for c in causes}
    total = by["release"]["effect"] + by["infrastructure"]["effect"]  # the canaries' own change
    assert causes[0]["kind"] == "infrastructure" and by["infrastructure"]["effect"] == pytest.approx(20, abs=1)
    assert abs(by["release"]["effect"]) < 0.1 * total
    lo, hi = by["release"]["ci"]
    assert lo <= 0 <= hi  # and its interval says so


@pytest.mark.parametrize("seed", range(3))
def test_a_release_that_causes_the_rise_gets_it(seed):
    causes = release_vs_infrastructure(fleet(seed, common=0.0, release=15.0), "latency_p99", "m:2", SWITCH)
    assert causes[0]["kind"] == "release" and causes[0]["effect"] == pytest.approx(15, abs=1.5)
    assert causes[0]["ci"][0] > 0 and abs(causes[1]["effect"]) < 1.5
    assert causes[0]["evidence"]["treated_devices"] == ["dev-0", "dev-1", "dev-2", "dev-3"]


def test_no_comparison_without_both_groups_on_both_sides():
    windows = [w for w in fleet(0, common=0.0, release=5.0) if w["device"] in ("dev-0", "dev-1")]
    assert release_vs_infrastructure(windows, "latency_p99", "m:2", SWITCH) is None  # no control devices


def test_interventional_causes_rank_before_detection_and_version_skew_first():
    findings = [
        {"kind": "prediction_shift", "target": "predictions", "p_value": 1e-30, "effect": 0.9, "windows": 2},
        {"kind": "covariate_drift", "target": "income", "p_value": 1e-20, "effect": 0.7, "windows": 2},
        {"kind": "missing_spike", "target": "age", "p_value": 1e-9, "effect": 0.2, "windows": 2},
        {"kind": "covariate_drift", "target": "zip", "p_value": 1e-3, "effect": 0.15, "windows": 2},
    ]
    att = {
        "prediction_psi": 0.9,
        "rows": 400,
        "features": {
            "income": {"recovery": 0.8, "ci": [0.7, 0.9]},
            "age": {"recovery": 0.1, "ci": [0.0, 0.2]},
        },
    }
    windows = [{"id": 7, "release": "m:1", "attribution": att, "findings": findings}]
    causes = rank_causes(findings, windows)
    assert [(c["kind"], c["target"], c["method"]) for c in causes] == [
        ("feature_drift", "income", "interventional"),
        ("data_quality", "age", "interventional"),
        ("feature_drift", "zip", "detection"),
    ]
    skewed = rank_causes(findings, [{**windows[0], "release": "m:3"}], instructed="m:1")
    assert (skewed[0]["kind"], skewed[0]["target"]) == ("version_skew", "m:3")
    text = summarize(
        {
            "tenant": "bank-a",
            "release": "m:1",
            "findings": findings,
            "impact": {"regulated": True, "devices": ["d1"], "traffic_share": 0.25},
            "causes": causes,
        }
    )
    assert text.startswith("At bank-a (regulated), on m:1, the model's predictions shifted (PSI 0.9")
    assert "Top cause: income (feature drift): redrawing it from its reference removes 80%" in text
    assert "(95% CI 70% to 90%) [windows 7]" in text and text.count(". ") <= 4
