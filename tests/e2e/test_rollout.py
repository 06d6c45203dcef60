"""Progressive delivery with real edge agents under live traffic: a deliberately bad
release is caught by the canary analysis and rolled back on every canary device, the
fleet ends on the previous release and the audit log shows each step; a good release
rolls out to the whole fleet."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest
from fedtools import enroll_all, finance_spec, wait_state
from test_edge import wait_devices

from consortia.cli.demo import free_port
from consortia.datasets.scenarios import load_scenario

pytestmark = pytest.mark.e2e

PLAN = {
    "target": {"selector": {"device": "scanner"}},
    "steps": [
        {"set_weight": 50},
        {
            "analysis": {
                "interval_seconds": 1.0,
                "samples": 3,
                "failure_limit": 0,
                "min_predictions": 40,
                "min_labels": 20,
                "metrics": [
                    {"name": "error_rate", "max": 0.05},
                    {"name": "prediction_shift", "max": 0.5},
                    {"name": "accuracy", "min": 0.6},  # on delayed labels posted by the traffic below
                ],
            }
        },
        {"set_weight": 100},
    ],
    "install_timeout_seconds": 120,
}


def train(fed, **kw) -> None:
    _, spec = finance_spec(rounds=2, **kw)
    with fed.client() as c:
        job_id = c.post_json("/v1/jobs", spec)["id"]
    job = wait_state(fed, job_id, lambda j: j["state"] in ("completed", "failed"), what="job end")
    assert job["state"] == "completed", job["reason"]


def traffic(fed, names, stop: threading.Event) -> None:
    """Live traffic with record ids; each batch's true outcomes follow as delayed labels."""
    frame = next(iter(load_scenario("finance", 1).partitions.values()))
    truth = (frame["Class"] == "bad").astype(int).tolist()
    frame = frame.drop(columns=["Class", "addr_state"])
    rows = [
        {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
        for r in frame.head(400).to_dict("records")
    ]
    i = 0
    with httpx.Client(timeout=10) as c:
        while not stop.is_set():
            for name in names:
                start = (i * 10) % 390
                ids = [f"{name}-{i}-{k}" for k in range(10)]
                headers = {"Authorization": f"Bearer {fed.edge_token(name)}"}
                url = f"http://127.0.0.1:{fed.edge_ports[name]}"
                with contextlib.suppress(httpx.TransportError):
                    c.post(f"{url}/v1/predict", json={"rows": rows[start : start + 10], "ids": ids}, headers=headers)
                    labels = [{"id": ids[k], "label": truth[start + k]} for k in range(10)]
                    c.post(f"{url}/v1/labels", json={"labels": labels}, headers=headers)
            i += 1
            time.sleep(0.05)


def rollout(fed, version: int, plan: dict = PLAN) -> dict:
    with fed.client() as c:
        rid = c.post_json("/v1/rollouts", {"model": "credit-risk", "version": version, "plan": plan})["id"]
    end = time.monotonic() + 180
    while time.monotonic() < end:
        with fed.client() as c:
            r = c.get_json(f"/v1/rollouts/{rid}")
        if r["state"] not in ("running",):
            return r
        time.sleep(0.5)
    raise AssertionError(f"rollout did not finish: {r}")


def test_bad_release_is_rolled_back_and_good_release_rolls_out(federation):
    fed, paths = federation(sites=2)
    fed.start_coordinator()
    enroll_all(fed, paths)
    train(fed)  # credit-risk:1, the stable release
    train(fed, learning_rate=10.0, local_epochs=3)  # credit-risk:2, deliberately bad (saturated scores)
    tenant = next(iter(paths))
    names = [f"scanner-{i}" for i in range(1, 5)]
    with fed.client() as c:
        for name in names:
            token = c.post_json(f"/v1/tenants/{tenant}/device-enrollment-tokens", {})["token"]
            fed.start_edge(name, token, "device=scanner", free_port())
    wait_devices(fed, lambda d: len(d) == 4 and all(x["report"] for x in d.values()), "4 devices reporting")
    with fed.client() as c:
        c.post_json("/v1/devices/assign", {"model": "credit-risk", "version": 1, "selector": {"device": "scanner"}})
    wait_devices(fed, lambda d: all(x["report"]["serving"] == "credit-risk:1" for x in d.values()), "fleet on v1")
    stop = threading.Event()
    feeder = threading.Thread(target=traffic, args=(fed, names, stop), daemon=True)
    feeder.start()
    try:
        time.sleep(2.0)  # baseline traffic on v1
        bad = rollout(fed, 2)
        assert bad["state"] == "rolled_back", (bad["reason"], bad["progress"]["samples"])
        assert "prediction_shift" in bad["reason"] and "analysis failed" in bad["reason"]
        assert all(smp["values"]["accuracy"] is not None for smp in bad["progress"]["samples"])
        assert len(bad["progress"]["moved"]) == 2  # only the canary half ever saw v2
        # the rollback is a new signed version (4) re-issuing v1's artifact: versions only move forward
        assert bad["progress"]["rollback_release"] == {"model": "credit-risk", "version": 3, "rollback_of": 1}
        with fed.client() as c:
            v1, v3 = (c.get_json(f"/v1/registry/models/credit-risk/versions/{v}") for v in (1, 3))
        assert v3["params_hash"] == v1["params_hash"] and v3["signed"] and v3["lineage"]["rollback_of"] == 1
        fleet = wait_devices(
            fed,
            lambda d: (
                sorted(x["report"]["serving"] for x in d.values())
                == ["credit-risk:1", "credit-risk:1", "credit-risk:3", "credit-risk:3"]
            ),
            "fleet back on v1's artifact",
        )
        on_v3 = sorted(n for n, x in fleet.items() if x["report"]["serving"] == "credit-risk:3")
        assert on_v3 == ["scanner-1", "scanner-2"]
        with fed.client() as c:  # devices refuse to go back in version numbers (anti-rollback)
            c.post_json("/v1/devices/assign", {"model": "credit-risk", "version": 1, "devices": ["scanner-1"]})
        refused = wait_devices(
            fed, lambda d: "anti-rollback" in (d["scanner-1"]["report"].get("reason") or ""), "anti-rollback refusal"
        )
        assert refused["scanner-1"]["report"]["serving"] == "credit-risk:3"
        train(fed, seed=1)  # credit-risk:4, a good retrain
        good = rollout(fed, 4)
        assert good["state"] == "succeeded", (good["reason"], good["progress"]["samples"])
        judged = [h for h in good["progress"]["history"] if "analysis" in h]
        assert judged and "pass" in judged[0]["analysis"]  # a pass needs every metric judged: accuracy held
        wait_devices(fed, lambda d: all(x["report"]["serving"] == "credit-risk:4" for x in d.values()), "fleet on v4")
    finally:
        stop.set()
        feeder.join(timeout=10)
    with fed.client() as c:
        entries = c.get_json("/v1/audit/entries", params={"limit": 5000})
    actions = [e["action"] for e in entries if e["subject"] == f"rollout:{bad['id']}"]
    assert actions[0] == "rollout.started" and "rollout.step" in actions and "rollout.analysis" in actions
    assert actions[-1] == "rollout.rolled_back"
    assert [e["action"] for e in entries if e["subject"] == f"rollout:{good['id']}"][-1] == "rollout.succeeded"


BLUE_GREEN = {  # one switch, after a pre-promotion analysis of the release in preview
    "target": {"selector": {"device": "scanner"}},
    "steps": [
        {
            "analysis": {
                "interval_seconds": 1.0,
                "samples": 3,
                "failure_limit": 0,
                "min_predictions": 40,
                "metrics": [
                    {"name": "error_rate", "max": 0.05},
                    {"name": "prediction_shift", "max": 0.5},
                    {"name": "accuracy_drop", "max": 0.1},
                ],
            }
        },
        {"set_weight": 100},
    ],
    "install_timeout_seconds": 120,
}


def test_blue_green_judges_the_preview_in_shadow_before_switching(federation):
    fed, paths = federation(sites=2)
    fed.start_coordinator()
    enroll_all(fed, paths)
    train(fed)  # credit-risk:1
    train(fed, learning_rate=10.0, local_epochs=3)  # credit-risk:2, deliberately bad
    tenant = next(iter(paths))
    names = ["scanner-a", "scanner-b"]
    with fed.client() as c:
        for name in names:
            token = c.post_json(f"/v1/tenants/{tenant}/device-enrollment-tokens", {})["token"]
            fed.start_edge(name, token, "device=scanner", free_port())
    wait_devices(fed, lambda d: len(d) == 2 and all(x["report"] for x in d.values()), "2 devices reporting")
    with fed.client() as c:
        c.post_json("/v1/devices/assign", {"model": "credit-risk", "version": 1, "selector": {"device": "scanner"}})
    wait_devices(fed, lambda d: all(x["report"]["serving"] == "credit-risk:1" for x in d.values()), "fleet on v1")
    stop = threading.Event()
    feeder = threading.Thread(target=traffic, args=(fed, names, stop), daemon=True)
    feeder.start()
    try:
        bad = rollout(fed, 2, BLUE_GREEN)
        assert bad["state"] == "rolled_back" and "prediction_shift" in bad["reason"], bad["reason"]
        assert bad["progress"]["moved"] == [] and "rollback_release" not in bad["progress"]  # nothing switched
        samples = bad["progress"]["samples"]
        assert samples and samples[-1]["values"]["accuracy_drop"] is not None  # judged on delayed labels too
        fleet = wait_devices(fed, lambda d: all(not x["report"].get("preview") for x in d.values()), "previews off")
        assert all(x["report"]["serving"] == "credit-risk:1" for x in fleet.values())
        train(fed, seed=1)  # credit-risk:3, a good retrain
        good = rollout(fed, 3, BLUE_GREEN)
        assert good["state"] == "succeeded", (good["reason"], good["progress"]["samples"])
        wait_devices(fed, lambda d: all(x["report"]["serving"] == "credit-risk:3" for x in d.values()), "fleet on v3")
    finally:
        stop.set()
        feeder.join(timeout=10)
    with fed.client() as c:
        entries = c.get_json("/v1/audit/entries", params={"limit": 5000})
    actions = [e["action"] for e in entries if e["subject"] == f"rollout:{bad['id']}"]
    assert actions[:2] == ["rollout.started", "rollout.preview"] and actions[-1] == "rollout.rolled_back"
    states = [e["detail"] for e in entries if e["action"] == "device.state"]
    assert states and all(d["serving"] != "credit-risk:2" for d in states)  # no device ever answered with v2
