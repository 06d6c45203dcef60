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
    # the approvers' private keys were written on their side, owner-only
    for site in r["sites"]:
        key = tmp_path / "ws" / "approvers" / f"{site}.pem"
        assert key.stat().st_mode & 0o777 == 0o600
