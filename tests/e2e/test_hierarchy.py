"""Hierarchical aggregation with real processes: two regional hubs of three sites each
give the same FedAvg model as the six sites flat."""

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


@pytest.fixture
def world(tmp_path):
    feds: list[Federation] = []
    yield tmp_path, feds
    for fed in reversed(feds):
        fed.stop()


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


def test_two_hubs_of_three_sites_equal_six_sites_flat(world):
    tmp_path, feds = world
    paths, spec = _partitions(tmp_path)
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

    with upper.client() as c:
        flat_id = c.post_json("/v1/jobs", {**spec, "name": "flat", "tenants": [f"flat-{n}" for n in SITES]})["id"]
    flat = wait_state(upper, flat_id, lambda j: j["state"] in ("completed", "failed"), what="flat job")
    assert flat["state"] == "completed", flat["reason"]
    with upper.client() as c:
        tree_id = c.post_json("/v1/jobs", {**spec, "name": "tree", "tenants": ["east", "west"]})["id"]
    tree = wait_state(upper, tree_id, lambda j: j["state"] in ("completed", "failed"), what="hub job")
    assert tree["state"] == "completed", tree["reason"]

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
        with hub.client() as c:
            relay = c.get_json("/v1/jobs")
        jobs = relay["jobs"] if isinstance(relay, dict) else relay
        assert any(j["name"] == f"relay-{tree_id}" and j["state"] == "completed" for j in jobs)
