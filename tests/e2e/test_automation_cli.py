"""Automation with real processes and the real CLI: a bad policy file is refused in one
line; a scheduled policy retrains the model on the sites (warm-started) and
`consortia automation history` shows the chain detect -> decide -> act -> validate."""

from __future__ import annotations

import json
import time

import pytest
from fedtools import finance_spec, wait_state
from test_governance import cli

pytestmark = pytest.mark.e2e


def test_a_scheduled_policy_retrains_and_its_history_shows_the_chain(federation, tmp_path):
    fed, paths = federation(sites=2)
    fed.start_coordinator()
    with fed.client() as c:
        for name, path in paths.items():
            token = c.post_json("/v1/tenants", {"name": name, "regulated": True})["enrollment"]["token"]
            fed.start_site(name, path, token, poll_seconds=1.0)
        fed.wait_sites(2)
        _, spec = finance_spec(rounds=1, min_sites=2)
        job_id = c.post_json("/v1/jobs", spec)["id"]
    job = wait_state(fed, job_id, lambda j: j["state"] in ("completed", "failed"), what="job end")
    assert job["state"] == "completed", job["reason"]

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: nightly\nmodel: credit-risk\ntriggers: [{kind: hourly}]\ngate: automatic\nactions: []\n")
    out = cli("automation", "apply", str(bad), token=fed.admin_token, url=fed.url)
    assert out.returncode == 2 and "invalid automation policy" in out.stderr and "Traceback" not in out.stderr

    good = tmp_path / "nightly.yaml"
    good.write_text(
        "name: nightly\nmodel: credit-risk\n"
        "triggers: [{kind: schedule, every_hours: 0.0005}]\n"  # ~2 s, so the test sees a run
        "gate: approval\nactions: [{kind: retrain, rounds: 1}]\ncooldown_hours: 24\n"
    )
    out = cli("automation", "apply", str(good), token=fed.admin_token, url=fed.url)
    assert out.returncode == 0 and "revision 1" in out.stdout, out.stderr

    def history(until) -> list:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            out = cli("automation", "history", "--json", token=fed.admin_token, url=fed.url)
            runs = json.loads(out.stdout)
            if runs and until(runs[0]):
                return runs
            time.sleep(1.0)
        raise AssertionError(f"automation run did not reach the expected state: {out.stdout[-2000:]}")

    (run,) = history(lambda r: r["state"] == "awaiting_approval")
    gate = run["steps"][1]
    assert gate["required"] == sorted(paths)  # the regulated banks whose data is in the model
    # each bank's approver signs locally with the CLI, with a key the CLI made and registered
    with fed.client() as c:
        for bank in paths:
            token = c.post_json("/v1/credentials", {"name": f"ap-{bank}", "role": "approver", "tenant": bank})["token"]
            key = tmp_path / f"{bank}.pem"
            out = cli("approver", "keygen", "--key", str(key), token=token, url=fed.url)
            assert out.returncode == 0, out.stderr
            out = cli("automation", "approve", str(run["id"]), "--key", str(key), token=token, url=fed.url)
            assert out.returncode == 0 and f"run {run['id']}" in out.stdout, out.stderr
    (run,) = history(lambda r: r["state"] not in ("awaiting_approval", "acting"))
    assert run["state"] == "done", run
    stages = [s["stage"] for s in run["steps"]]
    assert stages == ["detect", "decide", "approval", "approval", "decide", "act", "validate"]
    act = run["steps"][5]
    assert act["warm_start"] == "credit-risk:1" and run["steps"][6]["version"] == "credit-risk:2"
    shown = cli("automation", "history", token=fed.admin_token, url=fed.url)
    assert "schedule trigger" in shown.stdout and "warm-started from credit-risk:1" in shown.stdout
    assert "signed 'approve'" in shown.stdout
    listed = cli("automation", "list", token=fed.admin_token, url=fed.url)
    assert "nightly" in listed.stdout and "schedule" in listed.stdout
