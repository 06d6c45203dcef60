"""End-to-end: real coordinator and site processes on loopback, real data, kill -9."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from fedtools import AUDIT, assert_exactly_once, enroll_all, finance_spec, wait_state

pytestmark = pytest.mark.e2e


def test_federation_trains_and_sites_only_open_their_own_partition(federation, tmp_path):
    log = tmp_path / "opens.log"
    env = {
        "CONSORTIA_TEST_OPEN_LOG": str(log),
        "PYTHONPATH": os.pathsep.join([str(AUDIT), os.environ.get("PYTHONPATH", "")]),
    }
    fed, paths = federation(sites=3, fmt="csv", env=env)
    fed.start_coordinator()
    enroll_all(fed, paths)
    _, spec = finance_spec(rounds=3)
    with fed.client() as c:
        job = c.post_json("/v1/jobs", spec)
    job = wait_state(fed, job["id"], lambda j: j["state"] in ("completed", "failed"), what="job end")
    assert job["state"] == "completed", job["reason"]
    assert job["final_metrics"]["pooled_auc"] > 0.6
    assert set(job["final_metrics"]["per_site"]) == set(paths)
    # separate OS processes
    pids = {p.pid for p in fed.sites.values()} | {fed.coordinator.pid}
    assert len(pids) == 4
    # every data file a site process opened is its own partition; the coordinator opened none
    opened = [line.split(" :: ") for line in log.read_text().splitlines()]
    by_site = {name: [] for name in paths}
    for who, path in opened:
        assert "coordinator serve" not in who, f"coordinator opened {path}"
        site = next(n for n in paths if f"--name {n}" in who)
        by_site[site].append(path)
    for name, files in by_site.items():
        assert files, f"site {name} never opened its data"
        assert set(files) == {str(paths[name])}, f"{name} opened {set(files)}"
    assert_exactly_once(fed, job["id"], 3)


@pytest.mark.parametrize("point", ["tasks_handed_out", "update_stored", "mid_aggregation", "model_written"])
def test_coordinator_kill9_at_crash_point_resumes_exactly_once(federation, point):
    fed, paths = federation(sites=3)
    fed.start_coordinator(env={"CONSORTIA_CRASH_AT": f"{point}:2"})
    enroll_all(fed, paths)
    _, spec = finance_spec(rounds=3)
    with fed.client() as c:
        job_id = c.post_json("/v1/jobs", spec)["id"]
    assert fed.coordinator.wait(timeout=180) == -signal.SIGKILL, "the crash point was not reached"
    fed.start_coordinator()  # same home, no crash point
    job = wait_state(fed, job_id, lambda j: j["state"] in ("completed", "failed"), what="job end")
    assert job["state"] == "completed", job["reason"]
    assert job["rounds_completed"] == 3
    with fed.client() as c:
        kinds = [e["kind"] for e in c.get_json(f"/v1/jobs/{job_id}/events")]
    assert "coordinator_restarted" in kinds
    fed.stop()
    assert_exactly_once(fed, job_id, 3)


def test_coordinator_kill9_at_random_moments(federation):
    fed, paths = federation(sites=3)
    fed.start_coordinator()
    enroll_all(fed, paths)
    _, spec = finance_spec(rounds=4)
    with fed.client() as c:
        job_id = c.post_json("/v1/jobs", spec)["id"]
    rng = random.Random(7)
    for _ in range(3):
        time.sleep(rng.uniform(0.5, 2.5))
        fed.kill_coordinator()
        fed.start_coordinator()
    job = wait_state(fed, job_id, lambda j: j["state"] in ("completed", "failed"), what="job end")
    assert job["state"] == "completed", job["reason"]
    fed.stop()
    assert_exactly_once(fed, job_id, 4)


def test_site_kill9_mid_round_closes_by_deadline(federation):
    fed, paths = federation(sites=3)
    fed.start_coordinator()
    enroll_all(fed, paths)
    _, spec = finance_spec(rounds=3, deadline=6.0, min_sites=2)
    victim = sorted(paths)[0]
    with fed.client() as c:
        job_id = c.post_json("/v1/jobs", spec)["id"]
    wait_state(fed, job_id, lambda j: any(r["kind"] == "train" for r in j["rounds"]), what="round 1")
    fed.kill_site(victim)
    job = wait_state(fed, job_id, lambda j: j["state"] in ("completed", "failed"), what="job end")
    assert job["state"] == "completed", job["reason"]
    missed = [
        r
        for r in job["rounds"]
        if r["kind"] == "train" and victim in r["sampled"] and victim not in r["reported"] and r["state"] == "closed"
    ]
    assert missed, "no round closed without the killed site"
    assert all(len(r["reported"]) >= 2 for r in missed)
    assert set(job["final_metrics"]["per_site"]) == set(paths) - {victim}
