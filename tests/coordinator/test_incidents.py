"""Incidents from monitoring windows: windows of the same population open nothing; a
drift that persists over two windows opens one incident at that tenant, with the drifted
feature as its top finding, a priority from its impact, tenant-scoped reads and an
audited resolution."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from consortia.edge.monitoring import MISSING, WindowMonitor
from support import SPEC, synthetic_frame


def _device(coord, tenant: str, name: str) -> httpx.Client:
    token = coord.admin.post_json(f"/v1/tenants/{tenant}/device-enrollment-tokens", {})["token"]
    resp = coord.http.post("/v1/devices/enroll", json={"enrollment_token": token, "device_name": name, "labels": {}})
    assert resp.status_code in (200, 201), resp.text
    return resp.json()["credential"]


def _windows(bins, frame, rows=300, n=1):
    m = WindowMonitor("test-job:1", bins, min_count=10, max_rows=rows, max_seconds=1e9)
    for k in range(n):
        part = frame.iloc[k * rows : (k + 1) * rows]
        feeds = {c: part[c].to_numpy(np.float64).reshape(-1, 1) for c in ("x1", "x2")}
        feeds["cat"] = part["cat"].astype("string").fillna(MISSING).to_numpy(object).reshape(-1, 1)
        m.observe(feeds, np.full(len(part), 0.5), 0.001)
    return m.drain()


def test_persistent_drift_opens_one_tenant_scoped_incident(coord, tmp_path):
    coord.admin.post_json("/v1/tenants", {"name": "hosp-a", "regulated": True})
    sites = [coord.site(n, frame=synthetic_frame(500, i + 1), tmp=tmp_path) for i, n in enumerate(("a", "b"))]
    job = coord.wait_job(coord.admin.post_json("/v1/jobs", SPEC)["id"], sites)
    assert job["state"] == "completed", job["reason"]
    url = "/v1/registry/models/test-job/versions/1/release/files/reference.json"
    bins = json.loads(coord.admin.request("GET", url).content)["bins"]
    cred = _device(coord, "hosp-a", "scanner-1")
    coord.admin.post_json("/v1/devices/assign", {"model": "test-job", "version": 1, "tenant": "hosp-a", "selector": {}})
    headers = {"Authorization": f"Bearer {cred}"}

    def post(window):
        resp = coord.http.post("/v1/devices/me/monitoring", json=window, headers=headers)
        assert resp.status_code == 201, resp.text
        return resp.json()

    # the reference distribution, scores aside (the windows carry a constant 0.5 "model")
    for w in _windows(bins, synthetic_frame(900, 42), n=3):
        w["predictions"], w["prediction_groups"] = [w["rows"]], [0] * 10  # no output check here
        post(w)
    assert coord.admin.get_json("/v1/incidents") == []

    drifted = synthetic_frame(600, 43, shift=2.0)
    first, second = _windows(bins, drifted, n=2)
    for w in (first, second):
        w["predictions"], w["prediction_groups"] = [w["rows"]], [0] * 10
    assert post(first)["findings"] >= 1
    assert coord.admin.get_json("/v1/incidents") == []  # one window is not an incident
    post(second)
    (incident,) = coord.admin.get_json("/v1/incidents")
    top = incident["findings"][0]
    assert (top["kind"], top["target"], top["windows"]) == ("covariate_drift", "x1", 2) and top["effect"] > 0.25
    assert incident["tenant"] == "hosp-a" and incident["priority"] == "P1" and incident["state"] == "open"
    assert incident["impact"]["devices"] == ["scanner-1"] and incident["impact"]["regulated"] is True

    # tenant scoping: hosp-a's operator sees and resolves it, site b's tenant does not see it
    op_a = coord.admin.post_json("/v1/credentials", {"name": "ops-a", "role": "operator", "tenant": "hosp-a"})["token"]
    op_b = coord.admin.post_json("/v1/credentials", {"name": "ops-b", "role": "operator", "tenant": "b"})["token"]
    as_b = coord.client(op_b)
    assert as_b.get_json("/v1/incidents") == []
    from consortia.errors import PermissionDeniedError

    with pytest.raises(PermissionDeniedError, match="another tenant"):
        as_b.get_json(f"/v1/incidents/{incident['id']}")
    shown = coord.client(op_a).get_json(f"/v1/incidents/{incident['id']}")
    assert [w["findings"] for w in shown["recent_windows"]][0][0] == ["covariate_drift", "x1"]
    done = coord.client(op_a).post_json(f"/v1/incidents/{incident['id']}/resolve", {"note": "recalibrated"})
    assert done["state"] == "resolved"
    actions = [e["action"] for e in coord.admin.get_json("/v1/audit/entries", params={"limit": 1000})]
    assert "incident.opened" in actions and "incident.resolved" in actions
