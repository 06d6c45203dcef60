"""Automation policies close the loop: a drift incident at a regulated tenant starts a
run that waits for that tenant's signed approval, then retrains (warm-started, federated)
and calls an HMAC-signed webhook; every step is in the run and the audit log, and tenants
see only the runs that affected them."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from consortia.edge.monitoring import load_reference
from consortia.edge.runtime import load_release
from consortia.errors import ConflictError, PermissionDeniedError, ValidationError
from consortia.governance import keygen, sign_automation_approval
from consortia.protocol.automation import automation_approval_message, new_automation_approval
from support import SPEC, synthetic_frame
from support import enroll_device as _device
from support import serving_windows as _windows

SECRET = "a-webhook-secret-of-at-least-32-bytes!!"


class Hook(BaseHTTPRequestHandler):
    received: list[tuple[bytes, str]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append((body, self.headers.get("X-Consortia-Signature", "")))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hook():
    Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def _policy(url: str, gate: str = "approval") -> dict:
    return {
        "name": "drift-retrain",
        "model": "test-job",
        "triggers": [{"kind": "drift", "min_tenants": 1}],
        "gate": gate,
        "actions": [
            {"kind": "retrain", "rounds": 1},
            {"kind": "webhook", "url": url, "secret_env": "CONSORTIA_TEST_HOOK_SECRET"},
        ],
        "cooldown_hours": 1,
    }


def _wait(fn, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = fn()
        if out:
            return out
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_policy_validation_says_what_is_wrong(coord, tmp_path, monkeypatch):
    sites = [coord.site(n, frame=synthetic_frame(400, i + 1), tmp=tmp_path) for i, n in enumerate(("a", "b"))]
    assert coord.wait_job(coord.admin.post_json("/v1/jobs", SPEC)["id"], sites)["state"] == "completed"
    url = "http://127.0.0.1:9/hook"
    with pytest.raises(ValidationError, match="CONSORTIA_TEST_HOOK_SECRET is not set"):
        coord.admin.post_json("/v1/automation/policies", _policy(url))
    monkeypatch.setenv("CONSORTIA_TEST_HOOK_SECRET", SECRET)
    bad = {**_policy(url), "gate": "sometimes"}
    with pytest.raises(ValidationError, match="gate"):
        coord.admin.post_json("/v1/automation/policies", bad)
    with pytest.raises(ValidationError, match="validation checks a retrained version"):
        coord.admin.post_json(
            "/v1/automation/policies",
            {**_policy(url), "actions": [{"kind": "rollback"}], "validation": {"plan": {}}},
        )
    with pytest.raises(ValidationError, match="no registered model"):
        coord.admin.post_json("/v1/automation/policies", {**_policy(url), "model": "nope"})
    first = coord.admin.post_json("/v1/automation/policies", _policy(url))
    second = coord.admin.post_json("/v1/automation/policies", {**_policy(url), "cooldown_hours": 2})
    assert (first["revision"], second["revision"]) == (1, 2) and first["digest"] != second["digest"]
    assert [p["revision"] for p in coord.admin.get_json("/v1/automation/policies")] == [2]


def test_drift_at_a_regulated_tenant_waits_for_its_signature_then_retrains_and_calls_the_webhook(
    coord, tmp_path, monkeypatch, hook
):
    monkeypatch.setenv("CONSORTIA_TEST_HOOK_SECRET", SECRET)
    coord.admin.post_json("/v1/tenants", {"name": "hosp-a", "regulated": True})
    coord.admin.post_json("/v1/tenants", {"name": "bank-b", "regulated": True})
    sites = [coord.site(n, frame=synthetic_frame(500, i + 1), tmp=tmp_path) for i, n in enumerate(("a", "b"))]
    assert coord.wait_job(coord.admin.post_json("/v1/jobs", SPEC)["id"], sites)["state"] == "completed"
    coord.admin.post_json("/v1/automation/policies", _policy(hook))

    # detect: drift persisting at hosp-a opens an incident, which starts a run
    release = load_release(
        coord.http.app.state.governance.releases.paths(coord.http.app.state.store.get_version("test-job", 1))[0]
    )
    cred = _device(coord, "hosp-a", "scanner-1")
    coord.admin.post_json("/v1/devices/assign", {"model": "test-job", "version": 1, "tenant": "hosp-a"})
    for w in _windows(release, load_reference(release), synthetic_frame(600, 43, shift=2.0), n=2):
        resp = coord.http.post("/v1/devices/me/monitoring", json=w, headers={"Authorization": f"Bearer {cred}"})
        assert resp.status_code == 201, resp.text
    (run,) = coord.admin.get_json("/v1/automation/runs")
    assert run["state"] == "awaiting_approval" and run["tenants"] == ["hosp-a"]
    detect, decide = run["steps"]
    assert detect["stage"] == "detect" and detect["top_causes"][0]["target"] == "x1"
    assert decide == {**decide, "gate": "approval", "required": ["hosp-a"], "decision": "pending"}

    # decide: only hosp-a's approver, with hosp-a's registered key, can open the gate
    approvers = {}
    for tenant in ("hosp-a", "bank-b"):
        token = coord.admin.post_json("/v1/credentials", {"name": f"ap-{tenant}", "role": "approver", "tenant": tenant})
        approvers[tenant] = coord.client(token["token"])
        key, public = keygen(tmp_path / f"{tenant}.pem")
        approvers[tenant].post_json(f"/v1/tenants/{tenant}/approver-keys", {"public_key": public})
        approvers[tenant].key = key
    forged, _ = keygen(tmp_path / "forged.pem")
    path = f"/v1/automation/runs/{run['id']}/approvals"
    b = approvers["bank-b"]
    with pytest.raises(PermissionDeniedError, match="did not affect tenant 'bank-b'"):
        sign_automation_approval(b, b.key, run["id"])  # it cannot even read the run
    payload = new_automation_approval(run=run, decision="approve", tenant="bank-b")
    own = {
        "payload": payload.model_dump(mode="json"),
        "signature": b.key.sign(automation_approval_message(payload)).hex(),
    }
    with pytest.raises(PermissionDeniedError, match="not among the regulated tenants"):
        b.post_json(path, own)
    a = approvers["hosp-a"]
    with pytest.raises(PermissionDeniedError, match="does not verify"):
        a.post_json(path, sign_automation_approval(a, forged, run["id"]).model_dump())
    signed = sign_automation_approval(a, a.key, run["id"]).model_dump()
    replay = {**signed, "payload": {**signed["payload"], "run": run["id"] + 1}}
    with pytest.raises(ConflictError, match="replay"):
        a.post_json(path, replay)
    assert coord.admin.get_json(f"/v1/automation/runs/{run['id']}")["state"] == "awaiting_approval"
    run = a.post_json(path, signed)

    # act: a federated retraining warm-started from test-job:1, and the signed webhook
    assert run["state"] == "acting"
    retrain, webhook = [s for s in run["steps"] if s["stage"] == "act"]
    assert retrain["warm_start"] == "test-job:1" and retrain["ok"] and webhook["status"] == 204
    (body, signature), *_ = Hook.received
    assert signature == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert json.loads(body)["run"] == run["id"] and "signature" not in body.decode()
    with pytest.raises(ConflictError, match="not waiting for approvals"):
        a.post_json(path, sign_automation_approval(a, a.key, run["id"]).model_dump())

    # validate: the job finishes; the run records the new version, warm-started in its lineage
    assert coord.wait_job(retrain["job"], sites)["state"] == "completed"
    run = _wait(lambda: (r := coord.admin.get_json(f"/v1/automation/runs/{run['id']}"))["state"] == "done" and r)
    assert run["steps"][-1]["version"] == "test-job:2"
    v2 = coord.admin.get_json("/v1/registry/models/test-job/versions/2")
    assert v2["lineage"]["job"]["spec"]["warm_start"] == "test-job:1"
    assert [s["stage"] for s in run["steps"]] == ["detect", "decide", "approval", "decide", "act", "act", "validate"]
    actions = [e["action"] for e in coord.admin.get_json("/v1/audit/entries", params={"limit": 1000})]
    for stage in ("detect", "decide", "approval", "act", "validate"):
        assert f"automation.{stage}" in actions

    incident_id = detect["incidents"][0]["id"]
    assert coord.admin.get_json(f"/v1/incidents/{incident_id}")["automation"] == [
        {"run": run["id"], "policy": "drift-retrain", "state": "done"}
    ]
    # tenant scoping: bank-b's credentials see no run; hosp-a's see theirs
    assert approvers["bank-b"].get_json("/v1/automation/runs") == []
    with pytest.raises(PermissionDeniedError):
        approvers["bank-b"].get_json(f"/v1/automation/runs/{run['id']}")
    assert [r["id"] for r in a.get_json("/v1/automation/runs")] == [run["id"]]


def test_an_automatic_gate_acts_at_once_and_a_rejection_ends_a_run(coord, tmp_path, monkeypatch, hook):
    monkeypatch.setenv("CONSORTIA_TEST_HOOK_SECRET", SECRET)
    coord.admin.post_json("/v1/tenants", {"name": "shop", "regulated": False})
    sites = [coord.site(n, frame=synthetic_frame(500, i + 1), tmp=tmp_path) for i, n in enumerate(("a", "b"))]
    assert coord.wait_job(coord.admin.post_json("/v1/jobs", SPEC)["id"], sites)["state"] == "completed"
    policy = {
        **_policy(hook),
        "actions": [{"kind": "webhook", "url": hook, "secret_env": "CONSORTIA_TEST_HOOK_SECRET"}],
    }
    coord.admin.post_json("/v1/automation/policies", policy)  # gate: approval, but nobody regulated is affected
    release = load_release(
        coord.http.app.state.governance.releases.paths(coord.http.app.state.store.get_version("test-job", 1))[0]
    )
    cred = _device(coord, "shop", "till-1")
    coord.admin.post_json("/v1/devices/assign", {"model": "test-job", "version": 1, "tenant": "shop"})
    for w in _windows(release, load_reference(release), synthetic_frame(900, 44, shift=2.0), n=3):
        coord.http.post("/v1/devices/me/monitoring", json=w, headers={"Authorization": f"Bearer {cred}"})
    (run,) = coord.admin.get_json("/v1/automation/runs")  # the third window updates the incident: no second run
    assert run["state"] == "done"
    decide = next(s for s in run["steps"] if s["stage"] == "decide")
    assert decide["gate"] == "automatic" and decide["reason"] == "no regulated tenant is affected"
    assert len(Hook.received) == 1
