"""Sites serve deployed releases; a site whose own policy requires local approval holds
a release until its operator approves it, and says so."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from fedtools import finance_spec, wait_state
from test_edge import ROW, wait_devices

from consortia.cli.demo import free_port

pytestmark = pytest.mark.e2e


def test_sites_serve_and_a_site_can_hold_a_release_for_local_approval(federation, tmp_path):
    fed, paths = federation(sites=2)
    fed.start_coordinator()
    strict = tmp_path / "strict.yaml"
    strict.write_text("deployments_require_local_approval: true\n")
    names = list(paths)
    with fed.client() as c:
        for i, name in enumerate(names):
            token = c.post_json("/v1/tenants", {"name": name, "regulated": True})["enrollment"]["token"]
            fed.start_site(
                name, paths[name], token, poll_seconds=2.0, policy=strict if i == 1 else None, serve_port=free_port()
            )
    fed.wait_sites(2)
    _, spec = finance_spec(rounds=2)
    with fed.client() as c:
        job_id = c.post_json("/v1/jobs", spec)["id"]
    assert wait_state(fed, job_id, lambda j: j["state"] in ("completed", "failed"))["state"] == "completed"
    wait_devices(fed, lambda d: len(d) == 2 and all(x["report"] for x in d.values()), "site serving endpoints")
    with fed.client() as c:
        out = c.post_json("/v1/devices/assign", {"model": "credit-risk", "version": 1, "selector": {"kind": "site"}})
    assert sorted(d["name"] for d in out) == sorted(f"{n}-serving" for n in names)
    free, held = f"{names[0]}-serving", f"{names[1]}-serving"
    state = wait_devices(
        fed,
        lambda d: d[free]["report"]["serving"] == "credit-risk:1" and d[held]["report"]["state"] == "held",
        "one site serving, one holding",
    )
    assert "waits for this site's local approval" in state[held]["report"]["reason"]
    r = httpx.post(
        f"http://127.0.0.1:{fed.serve_ports[names[0]]}/v1/predict",
        json={"row": ROW},
        timeout=10,
        headers={"Authorization": f"Bearer {fed.site_serving_token(names[0])}"},
    )
    assert r.status_code == 200 and r.json()["release"] == "credit-risk:1"

    approve = subprocess.run(
        [
            sys.executable,
            "-m",
            "consortia.cli.main",
            "site",
            "approve-release",
            "credit-risk:1",
            "--home",
            str(fed.workdir / "sites" / names[1]),
        ],
        capture_output=True,
        text=True,
    )
    assert approve.returncode == 0, approve.stderr
    wait_devices(fed, lambda d: d[held]["report"]["serving"] == "credit-risk:1", "held site serving after approval")
