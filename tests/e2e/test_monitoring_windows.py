"""Monitoring windows from a real edge agent: traffic on a released model becomes windows
of aggregates on the release's agreed bins, every count 0 or at least the minimum, no
value or identifier of the traffic in them; windows made offline arrive later; a tenant
reads only its own."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fedtools import enroll_all
from test_edge import train, wait_devices

from consortia.cli.demo import free_port
from consortia.datasets.scenarios import load_scenario
from consortia.errors import ConsortiaError

pytestmark = pytest.mark.e2e


def windows(fed, **params) -> list[dict]:
    with fed.client() as c:
        return c.get_json("/v1/monitoring/windows", params=params)


def test_windows_of_aggregates_reach_the_coordinator_even_after_an_outage(federation):
    fed, paths = federation(sites=2)
    fed.start_coordinator()
    enroll_all(fed, paths)
    train(fed)
    tenant, other = sorted(paths)
    with fed.client() as c:
        token = c.post_json(f"/v1/tenants/{tenant}/device-enrollment-tokens", {})["token"]
        fed.start_edge(
            "scanner-1", token, "device=scanner", free_port(), extra=["--window-rows", "100", "--min-count", "5"]
        )
    wait_devices(fed, lambda d: d.get("scanner-1", {}).get("report"), "device reporting")
    with fed.client() as c:
        c.post_json("/v1/devices/assign", {"model": "credit-risk", "version": 1, "selector": {"device": "scanner"}})
    wait_devices(fed, lambda d: d["scanner-1"]["report"]["serving"] == "credit-risk:1", "serving v1")
    frame = next(iter(load_scenario("finance", 1).partitions.values()))
    rows = [
        {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
        for r in frame.drop(columns=["Class", "addr_state"]).head(400).to_dict("records")
    ]
    url = f"http://127.0.0.1:{fed.edge_ports['scanner-1']}"
    headers = {"Authorization": f"Bearer {fed.edge_token('scanner-1')}"}

    def send(batch) -> None:
        for i in range(0, len(batch), 20):
            r = httpx.post(f"{url}/v1/predict", json={"rows": batch[i : i + 20]}, headers=headers, timeout=10)
            assert r.status_code == 200, r.text

    send(rows[:200])  # two full windows of 100 rows
    deadline = time.monotonic() + 60
    while len(got := windows(fed, tenant=tenant)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(got) >= 2, got
    with fed.client() as c:
        plan = c.get_json("/v1/registry/models/credit-risk/versions/1")["lineage"]["preprocessing"]
    for w in got:
        assert (w["release"], w["device"], w["tenant"], w["rows"], w["min_count"]) == (
            "credit-risk:1",
            "scanner-1",
            tenant,
            100,
            5,
        )
        int_rate, sub_grade = w["features"]["int_rate"], w["features"]["sub_grade"]  # coarsened: groups map bins
        assert len(int_rate["groups"]) == len(plan["cuts"]["int_rate"]) + 1
        assert len(sub_grade["groups"]) == len(plan["categorical"]["sub_grade"]) + 1
        counts = [c for f in w["features"].values() for c in (*f["counts"], f["missing"], f["out_of_range"])]
        assert all(c == 0 or c >= 5 for c in counts + w["predictions"])
        assert sum(w["features"]["int_rate"]["counts"]) + w["features"]["int_rate"]["suppressed"] == 100
        text = json.dumps(w)  # no value of the traffic: no category string, no exact amount
        assert "B2" not in text and "term_36" not in text and str(rows[0]["funded_amnt"]) not in text

    fed.kill_coordinator()  # windows made while the coordinator is away wait at the device
    send(rows[200:300])
    time.sleep(2.0)
    fed.start_coordinator()
    deadline = time.monotonic() + 60
    while len(windows(fed, tenant=tenant)) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(windows(fed, tenant=tenant)) >= 3

    with fed.client() as c:  # the other tenant's operator sees none of this
        op = c.post_json("/v1/credentials", {"name": "ops-other", "role": "operator", "tenant": other})["token"]
    with httpx.Client(base_url=fed.url, headers={"Authorization": f"Bearer {op}"}) as raw:
        assert raw.get("/v1/monitoring/windows").json() == []
        assert raw.get("/v1/monitoring/windows", params={"tenant": tenant}).status_code == 403
    sent = {k: v for k, v in got[0].items() if k not in ("id", "device", "tenant", "received_at", "findings")}
    with fed.client() as c, pytest.raises(ConsortiaError, match="only a device credential"):
        c.post_json("/v1/devices/me/monitoring", sent)  # only devices send windows
