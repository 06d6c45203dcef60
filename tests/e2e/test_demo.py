"""`consortia demo --headless` end to end: the report contract, governance included."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_registers_prints_card_promotes_with_approvals_and_reports(tmp_path):
    report = tmp_path / "report.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "consortia.cli.main",
            "demo",
            "--headless",
            "--rounds",
            "5",
            "--workdir",
            str(tmp_path / "ws"),
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Model card: credit-risk version 1" in out.stdout
    assert "promoted credit-risk:1 to staging" in out.stdout
    assert "missing approvals from: bank-midwest, bank-northeast, bank-south, bank-west" in out.stdout
    assert "promoted credit-risk:1 to production" in out.stdout
    r = json.loads(report.read_text())
    reg = r["registry"]
    assert (reg["model"], reg["version"], reg["stage"], reg["signed"]) == ("credit-risk", 1, "production", True)
    assert reg["approvals"] == sorted(r["sites"]) and reg["audit_verified"] is True
    assert set(r) >= {"scenario", "seed", "federated", "centralized", "local_only", "registry", "job_id", "delivery"}
    # delivery: a canary rollout to the sites' serving endpoints, every site ends serving the release
    assert r["delivery"]["state"] == "succeeded", r["delivery"]
    assert r["delivery"]["serving"] == {site: "credit-risk:1" for site in r["sites"]}
    assert "rollout 1: succeeded" in out.stdout
    # a local adapter: the largest bank re-fits its intercept; the composite serves there only
    ad = r["adapter"]
    assert ad["params"] == ["0.bias"] and ad["release"] == f"credit-risk-{ad['site']}:1"
    assert ad["serving"] == ad["release"] and ad["base"] == "credit-risk:1"
    assert all(isinstance(ad[k]["loss"], float) for k in ("before", "after"))  # base vs composite at that bank
    # the loop: ordinary traffic opens nothing; drift injected at one bank opens an incident
    # there whose top cause is the injected feature; the regulated bank signs the gate; a
    # warm-started retraining is canaried and promoted
    inc = r["incident"]
    assert inc["incidents_before_injection"] == 0
    assert inc["injected"]["kind"] == "numeric covariate shift" and inc["injected"]["target"] == "int_rate"
    top = inc["causes"][0]
    # (a rate shock both moves int_rate's distribution and pushes it out of range: either name fits)
    assert top["kind"] in ("feature_drift", "data_quality")
    assert (top["target"], top["method"]) == ("int_rate", "interventional")
    assert top["ci"][0] > 0 and all(c["effect"] <= top["effect"] for c in inc["causes"][1:])
    assert inc["summary"].startswith(f"At {inc['injected']['site']} (regulated)")
    assert inc["state"] == "done" and inc["retrained"] == "credit-risk:2"
    stages = [a["stage"] for a in inc["actions"]]
    assert stages[:5] == ["detect", "decide", "approval", "decide", "act"] and stages.count("validate") >= 3
    assert any("canary passed" in a["what"] for a in inc["actions"])
    assert inc["actions"][-1]["what"] == "promoted credit-risk:2; to production"
    # the approvers' private keys were written on their side, owner-only
    for site in r["sites"]:
        key = tmp_path / "ws" / "approvers" / f"{site}.pem"
        assert key.stat().st_mode & 0o777 == 0o600
