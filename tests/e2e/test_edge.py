"""Edge agents as real processes: enroll, install a release through TUF on a signed
instruction, serve /v1/predict, keep serving with the coordinator killed, and converge on
the next release when it returns."""

from __future__ import annotations

import time

import httpx
import pytest
from fedtools import enroll_all, finance_spec, wait_state

from consortia.cli.demo import free_port

pytestmark = pytest.mark.e2e

ROW = {
    "funded_amnt": 10000,
    "term": "term_36",
    "int_rate": 12.5,
    "sub_grade": "B2",
    "verification_status": "Verified",
    "annual_inc": 60000.0,
    "emp_length": "emp_5",
    "delinq_2yrs": 0,
    "inq_last_6mths": 1,
    "revol_util": 40.0,
    "acc_now_delinq": 0,
    "open_il_6m": 1,
    "open_il_12m": 0,
    "open_il_24m": 1,
    "total_bal_il": 20000,
    "all_util": 60,
    "inq_fi": 1,
    "inq_last_12m": 2,
    "delinq_amnt": 0,
    "num_il_tl": 5,
    "total_il_high_credit_limit": 30000,
}


def devices(fed) -> dict[str, dict]:
    with fed.client() as c:
        return {d["name"]: d for d in c.get_json("/v1/devices")}


def wait_devices(fed, pred, what: str, timeout: float = 120.0) -> dict[str, dict]:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = devices(fed)
            if pred(last):
                return last
        except Exception:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}: {last}; logs in {fed.logs}")


def predict(fed, name: str) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{fed.edge_ports[name]}/v1/predict",
        json={"row": ROW},
        timeout=10,
        headers={"Authorization": f"Bearer {fed.edge_token(name)}"},
    )


def train(fed) -> int:
    _, spec = finance_spec(rounds=2)
    with fed.client() as c:
        job_id = c.post_json("/v1/jobs", spec)["id"]
    job = wait_state(fed, job_id, lambda j: j["state"] in ("completed", "failed"), what="job end")
    assert job["state"] == "completed", job["reason"]
    return job_id


def test_edge_agents_install_serve_offline_and_converge(federation):
    fed, paths = federation(sites=2)
    fed.start_coordinator()
    enroll_all(fed, paths)
    train(fed)
    tenant = next(iter(paths))
    with fed.client() as c:
        for name, labels in (
            ("scanner-1", "region=eu,device=scanner"),
            ("scanner-2", "region=eu,device=scanner"),
            ("kiosk-1", "region=us,device=kiosk"),
        ):
            token = c.post_json(f"/v1/tenants/{tenant}/device-enrollment-tokens", {})["token"]
            fed.start_edge(name, token, labels, free_port())
    wait_devices(fed, lambda d: len(d) == 3 and all(x["report"] for x in d.values()), "3 devices reporting")
    with fed.client() as c:
        out = c.post_json("/v1/devices/assign", {"model": "credit-risk", "version": 1, "selector": {"region": "eu"}})
    assert sorted(d["name"] for d in out) == ["scanner-1", "scanner-2"]
    state = wait_devices(
        fed,
        lambda d: all(d[n]["report"]["serving"] == "credit-risk:1" for n in ("scanner-1", "scanner-2")),
        "eu devices serving v1",
    )
    assert state["kiosk-1"]["report"]["state"] == "idle" and state["kiosk-1"]["report"]["serving"] is None
    first = predict(fed, "scanner-1").json()
    assert first["release"] == "credit-risk:1" and 0 <= first["predictions"][0]["probability"] <= 1
    assert predict(fed, "kiosk-1").status_code >= 400  # nothing assigned: nothing served

    fed.kill_coordinator()  # offline: devices keep answering from their last known good release
    for _ in range(3):
        for name in ("scanner-1", "scanner-2"):
            r = predict(fed, name)
            assert r.status_code == 200 and r.json()["release"] == "credit-risk:1"
        time.sleep(1.0)

    fed.start_coordinator()
    train(fed)  # credit-risk:2
    with fed.client() as c:
        c.post_json("/v1/devices/assign", {"model": "credit-risk", "version": 2, "selector": {"device": "scanner"}})
    wait_devices(
        fed,
        lambda d: all(d[n]["report"]["serving"] == "credit-risk:2" for n in ("scanner-1", "scanner-2")),
        "eu devices converged on v2",
    )
    assert predict(fed, "scanner-2").json()["release"] == "credit-risk:2"
    with fed.client() as c:
        actions = [e["action"] for e in c.get_json("/v1/audit/entries", params={"limit": 5000})]
    assert actions.count("device.enrolled") == 3 and actions.count("device.instructed") == 4
    assert actions.count("device.state") >= 4
