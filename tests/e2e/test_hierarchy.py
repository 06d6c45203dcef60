"""Hierarchical aggregation with real processes: two regional hubs of three sites each
give the same FedAvg model as the six sites flat, and relay secure rounds as secure
rounds of their own."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fedtools import wait_state

from consortia.cli.demo import Federation
from consortia.datasets.scenarios import load_scenario
from consortia.protocol.tensors import decode

pytestmark = pytest.mark.e2e

SITES = [f"s{i}" for i in range(6)]


def _partitions(tmp_path):
    sc = load_scenario("finance", rounds=3, seed=0)
    full = pd.concat(list(sc.partitions.values()), ignore_index=True)
    paths = {}
    for i, name in enumerate(SITES):
        path = tmp_path / "data" / f"{name}.parquet"
        path.parent.mkdir(exist_ok=True)
        full.iloc[i::6].reset_index(drop=True).to_parquet(path, index=False)
        paths[name] = path
    spec = {**sc.spec, "rounds": 3, "round_deadline_seconds": 90, "min_sites": 2}
    return paths, spec


def _model(fed: Federation, job: dict) -> dict[str, np.ndarray]:
    with fed.client() as c:
        return decode(c.request("GET", f"/v1/blobs/{job['model_hash']}").content)[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An upper coordinator with six sites enrolled directly and two hubs (east, west),
    each a site of the upper coordinator with three site processes of its own."""
    tmp_path = tmp_path_factory.mktemp("hierarchy")
    paths, spec = _partitions(tmp_path)
    feds: list[Federation] = []
    try:
        upper = Federation(tmp_path / "upper")
        feds.append(upper)
        upper.start_coordinator()
        with upper.client() as c:
            # six sites enrolled directly ...
            for name in SITES:
                token = c.post_json("/v1/tenants", {"name": f"flat-{name}"})["enrollment"]["token"]
                upper.start_site(name, paths[name], token, poll_seconds=2.0)
            # ... and two hubs, each a site of the upper coordinator
            hub_tokens = {h: c.post_json("/v1/tenants", {"name": h})["enrollment"]["token"] for h in ("east", "west")}
        hubs = {}
        for h, members in (("east", SITES[:3]), ("west", SITES[3:])):
            hub = Federation(tmp_path / h)
            feds.append(hub)
            hub.start_coordinator(extra=["--upstream", upper.url, "--token", hub_tokens[h], "--upstream-name", h])
            with hub.client() as c:
                for name in members:
                    token = c.post_json("/v1/tenants", {"name": f"{h}-{name}"})["enrollment"]["token"]
                    hub.start_site(name, paths[name], token, poll_seconds=2.0)
            hub.wait_sites(3)
            hubs[h] = hub
        upper.wait_sites(8)
        yield upper, hubs, spec
    finally:
        for fed in reversed(feds):
            fed.stop()


def _run(upper: Federation, spec: dict, what: str) -> dict:
    with upper.client() as c:
        job_id = c.post_json("/v1/jobs", spec)["id"]
    job = wait_state(upper, job_id, lambda j: j["state"] in ("completed", "failed"), what=what)
    assert job["state"] == "completed", job["reason"]
    return job


def _relay_jobs(hub: Federation, upstream_job: int) -> list[dict]:
    with hub.client() as c:
        relay = c.get_json("/v1/jobs")
    jobs = relay["jobs"] if isinstance(relay, dict) else relay
    return [j for j in jobs if j["name"] == f"relay-{upstream_job}"]


def test_two_hubs_of_three_sites_equal_six_sites_flat(world):
    upper, hubs, spec = world
    flat = _run(upper, {**spec, "name": "flat", "tenants": [f"flat-{n}" for n in SITES]}, "flat job")
    tree = _run(upper, {**spec, "name": "tree", "tenants": ["east", "west"]}, "hub job")
    tree_id = tree["id"]

    a, b = _model(upper, flat), _model(upper, tree)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)
    # the upper coordinator saw two sites, each with its three sites' examples
    train = [r for r in tree["rounds"] if r["kind"] == "train"]
    assert sorted(train[0]["metrics"]["sites_reported"]) == ["east", "west"]
    assert (
        train[0]["metrics"]["examples"]
        == next(r for r in flat["rounds"] if r["kind"] == "train")["metrics"]["examples"]
    )
    assert tree["final_metrics"]["n"] == flat["final_metrics"]["n"]
    assert tree["final_metrics"]["pooled_auc"] == pytest.approx(flat["final_metrics"]["pooled_auc"], abs=1e-3)
    # each hub ran a relay job with its own three sites
    for hub in hubs.values():
        assert [j["state"] for j in _relay_jobs(hub, tree_id)] == ["completed"]


def test_a_secure_round_through_hubs_gives_the_plain_model(world):
    # two hubs and one site directly: three members of the upper secure round; each hub
    # relays it as a secure round of its own three sites and masks the region's mean again
    upper, hubs, spec = world
    members = {**spec, "tenants": ["east", "west", "flat-s0"], "min_sites": 3}
    secure = {**members, "name": "secure-tree", "secure_aggregation": {"clip_range": 10.0, "stage_seconds": 30}}
    plain = _run(upper, {**members, "name": "plain-tree"}, "plain hub job")
    masked = _run(upper, secure, "secure hub job")

    a, b = _model(upper, plain), _model(upper, masked)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)  # fixed point twice, at 2^-26 of the range
    for r in (r for r in masked["rounds"] if r["kind"] == "train"):
        sa = r["metrics"]["secure_aggregation"]
        assert sa["survivors"] == 3 and sa["dropped_by_stage"] == {}
    assert masked["final_metrics"]["pooled_auc"] == pytest.approx(plain["final_metrics"]["pooled_auc"], abs=1e-3)
    for hub in hubs.values():  # the hub's own rounds were secure: it never held one site's update
        (relay,) = _relay_jobs(hub, masked["id"])
        assert relay["state"] == "completed"
        train = [r for r in relay["rounds"] if r["kind"] == "train"]
        assert len(train) == spec["rounds"]
        assert all(r["metrics"]["secure_aggregation"]["survivors"] == 3 for r in train)
