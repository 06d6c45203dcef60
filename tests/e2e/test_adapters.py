"""Global base + local adapter, end to end with real site and edge processes: a site
fine-tunes the last layer of the released global model on its own data, the composite is
registered, signed and delivered like any other release (lineage to both), only the
adapter's tensors differ from the base, and it runs only on its own tenant's devices."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from fedtools import enroll_all, finance_spec, wait_state
from test_edge import ROW, wait_devices

from consortia.cli.demo import free_port
from consortia.errors import ConsortiaError
from consortia.protocol.tensors import decode

pytestmark = pytest.mark.e2e


def test_site_adapter_becomes_a_signed_composite_release_for_its_own_devices(federation):
    fed, paths = federation(sites=2)
    fed.start_coordinator()
    enroll_all(fed, paths)
    site_a, site_b = sorted(paths)
    _, spec = finance_spec(rounds=2, recipe={"name": "mlp", "options": {"hidden": [16]}})
    with fed.client() as c:
        job_id = c.post_json("/v1/jobs", spec)["id"]
    assert wait_state(fed, job_id, lambda j: j["state"] in ("completed", "failed"))["state"] == "completed"

    with fed.client() as c:
        # bad declarations are refused with what to do; nothing is created
        with pytest.raises(ConsortiaError, match="matches no parameter"):
            c.post_json("/v1/jobs/adapt", {"base": "credit-risk:1", "site": site_a, "params": ["head.*"]})
        with pytest.raises(ConsortiaError, match="that is a retrain"):
            c.post_json("/v1/jobs/adapt", {"base": "credit-risk:1", "site": site_a, "params": ["*"]})
        with pytest.raises(ConsortiaError, match="must be NAME:VERSION"):
            c.post_json("/v1/jobs/adapt", {"base": "credit-risk", "site": site_a})
        with pytest.raises(ConsortiaError, match="not found|no version"):
            c.post_json("/v1/jobs/adapt", {"base": "credit-risk:9", "site": site_a})
        assert len(c.get_json("/v1/jobs")["jobs"]) == 1
        # another tenant's operator cannot fine-tune on site A's data
        op_b = c.post_json("/v1/credentials", {"name": "ops-b", "role": "operator", "tenant": site_b})["token"]
        op_a = c.post_json("/v1/credentials", {"name": "ops-a", "role": "operator", "tenant": site_a})["token"]
    with httpx.Client(base_url=fed.url, headers={"Authorization": f"Bearer {op_b}"}) as raw:
        resp = raw.post("/v1/jobs/adapt", json={"base": "credit-risk:1", "site": site_a})
        assert resp.status_code == 403 and "another tenant" in resp.json()["detail"]
    with httpx.Client(base_url=fed.url, headers={"Authorization": f"Bearer {op_a}"}) as raw:
        resp = raw.post("/v1/jobs/adapt", json={"base": "credit-risk:1", "site": site_a, "local_epochs": 3})
        assert resp.status_code == 201, resp.text
        adapt_id = resp.json()["id"]
    job = wait_state(fed, adapt_id, lambda j: j["state"] in ("completed", "failed"), what="adapter job")
    assert job["state"] == "completed", job["reason"]
    assert [r["kind"] for r in job["rounds"]] == ["train", "evaluate"]
    assert all(r["sampled"] == [site_a] for r in job["rounds"])  # only the adapting site took part

    name = f"credit-risk-{site_a}"
    with fed.client() as c:
        base = c.get_json("/v1/registry/models/credit-risk/versions/1")
        comp = c.get_json(f"/v1/registry/models/{name}/versions/1")
        base_params = decode(c.request("GET", f"/v1/blobs/{base['params_hash']}").content)[0]
        comp_params = decode(c.request("GET", f"/v1/blobs/{comp['params_hash']}").content)[0]
    assert comp["signed"]
    lin = comp["lineage"]["composite"]
    assert lin["base"]["ref"] == "credit-risk:1" and lin["base"]["release_digest"] == base["release_digest"]
    assert lin["base"]["params_hash"] == base["params_hash"]
    assert lin["adapter"]["site"] == site_a and lin["adapter"]["params"] == ["2.bias", "2.weight"]
    changed = sorted(k for k in base_params if not np.array_equal(base_params[k], comp_params[k]))
    assert changed == ["2.bias", "2.weight"]  # the base's tensors are untouched
    assert lin["adapter"]["bytes"] == sum(comp_params[k].nbytes for k in changed)

    # delivery: one device per tenant, both on the base first
    with fed.client() as c:
        for tenant, dev in ((site_a, "dev-a"), (site_b, "dev-b")):
            token = c.post_json(f"/v1/tenants/{tenant}/device-enrollment-tokens", {})["token"]
            fed.start_edge(dev, token, "device=scanner", free_port())
    wait_devices(fed, lambda d: len(d) == 2 and all(x["report"] for x in d.values()), "2 devices reporting")
    with fed.client() as c:
        c.post_json("/v1/devices/assign", {"model": "credit-risk", "version": 1, "selector": {"device": "scanner"}})
    wait_devices(fed, lambda d: all(x["report"]["serving"] == "credit-risk:1" for x in d.values()), "on the base")
    with fed.client() as c:
        with pytest.raises(ConsortiaError, match=f"may run only on devices of tenant '{site_a}'"):
            c.post_json("/v1/devices/assign", {"model": name, "version": 1, "selector": {"device": "scanner"}})
        c.post_json("/v1/devices/assign", {"model": name, "version": 1, "tenant": site_a, "selector": {}})
    fleet = wait_devices(fed, lambda d: d["dev-a"]["report"]["serving"] == f"{name}:1", "dev-a on the composite")
    assert fleet["dev-b"]["report"]["serving"] == "credit-risk:1"
    preds = {}
    for dev in ("dev-a", "dev-b"):
        resp = httpx.post(
            f"http://127.0.0.1:{fed.edge_ports[dev]}/v1/predict",
            json={"rows": [ROW]},
            headers={"Authorization": f"Bearer {fed.edge_token(dev)}"},
        )
        assert resp.status_code == 200, resp.text
        preds[dev] = resp.json()
    assert preds["dev-a"]["release"] == f"{name}:1" and preds["dev-b"]["release"] == "credit-risk:1"
    assert preds["dev-a"]["predictions"] != preds["dev-b"]["predictions"]
    # dev-a downloaded the composite's manifest, its two adapter tensors and its reference
    # profile (the adapting site's data), nothing else: graph, config, sample, monitoring
    # bins and base tensors are the base's, already held (by hash)
    parts = {}
    for dev, rel in (("dev-b", "credit-risk-1"), ("dev-a", f"{name}-1")):
        manifest = json.loads((fed.workdir / "edges" / dev / "releases" / rel / "manifest.json").read_text())
        parts[rel] = {p["sha256"]: p for p in manifest["parts"] if p["role"] not in ("card", "lineage")}
    new = set(parts[f"{name}-1"]) - set(parts["credit-risk-1"])
    new_parts = [parts[f"{name}-1"][sha] for sha in new]
    assert sorted(p.get("name", p["role"]) for p in new_parts) == ["inner.2.bias", "inner.2.weight", "reference"]
    held = {p.name for p in (fed.workdir / "edges" / "dev-a" / "targets" / "parts").iterdir()}
    assert held == set(parts["credit-risk-1"]) | new  # no card, no lineage, no duplicate
    with fed.client() as c:
        md = c.request("GET", f"/v1/registry/models/{name}/versions/1/card", params={"format": "md"}).text
    assert "## Composite release" in md and "Global base credit-risk:1" in md
