"""Buffered asynchronous aggregation (FedBuff) through the real app: sites in threads at
different speeds; the slow one contributes, down-weighted by staleness."""

from __future__ import annotations

import time

import numpy as np
import pytest

from consortia.errors import ValidationError
from consortia.protocol.tensors import decode
from consortia.site.tasks import dispatch
from support import SPEC, run_concurrently

ASYNC = {
    **SPEC,
    "name": "fedbuff-job",
    "rounds": 6,
    "min_sites": 2,
    "asynchronous": {"buffer_size": 2, "staleness_exponent": 0.5},
}


def slow(ctx, task):
    """A site on a slow link: it answers a train task only once two newer versions of the
    model exist (waiting on the job's progress, not on a clock, so the test is not racy)."""
    if task.kind == "train":
        end = time.monotonic() + 30
        while time.monotonic() < end:
            job = ctx.observer.get_json(f"/v1/jobs/{task.job_id}")
            progressed = job["rounds_completed"] >= min(task.round + 1, ASYNC["rounds"])
            if job["state"] != "running" or progressed:
                break
            time.sleep(0.05)
    dispatch(ctx, task)


def test_slow_sites_contribute_with_staleness_weights_instead_of_being_dropped(coord):
    sites = [coord.site(name) for name in ("fast-a", "fast-b", "slow-c")]
    sites[2].observer = coord.admin  # a site cannot read jobs; the test's clock is the admin's view
    job, errors = run_concurrently(
        coord, sites, coord.admin.post_json("/v1/jobs", ASYNC)["id"], handlers={"slow-c": slow}
    )
    assert job["state"] == "completed", (job["reason"], errors)
    assert job["final_metrics"]["pooled_auc"] > 0.7
    versions = [r for r in job["rounds"] if (r["metrics"] or {}).get("fedbuff")]
    assert len(versions) == 6  # versions 2..6 and the evaluated 7th
    staleness = [
        (site, tau) for r in versions for site, taus in r["metrics"]["fedbuff"]["staleness"].items() for tau in taus
    ]
    slow_taus = [tau for site, tau in staleness if site == "slow-c"]
    fast = [site for site, _ in staleness if site != "slow-c"]
    assert slow_taus and min(slow_taus) >= 1  # applied although versions had moved on
    assert len(fast) > len(slow_taus)  # fast sites report more often
    applied = [u for r in versions for u in r["metrics"]["fedbuff"]["applied"]]
    assert len(applied) == len(set(applied)) == 12  # every update applied once, K at a time


def test_a_version_is_the_staleness_weighted_mean_of_its_buffer(coord):
    sites = [coord.site(name) for name in ("fast-a", "fast-b", "slow-c")]
    sites[2].observer = coord.admin
    job, _ = run_concurrently(coord, sites, coord.admin.post_json("/v1/jobs", ASYNC)["id"], handlers={"slow-c": slow})
    assert job["state"] == "completed", job["reason"]
    store, blobs = coord.http.app.state.store, coord.http.app.state.blobs
    rounds = store.job_rounds(job["id"])
    by_id = {r.id: r for r in rounds}
    updates = {u.id: u for r in rounds for u in store.round_updates(r.id)}
    for r in rounds:
        fb = (r.metrics or {}).get("fedbuff")
        if not fb:
            continue
        version = fb["made_from_version"]
        before = next(x for x in rounds if x.kind == "train" and x.number == version and x.global_in)
        current = decode(blobs.get(before.global_in))[0]
        num, den = {k: np.zeros(v.shape) for k, v in current.items()}, 0.0
        for uid in fb["applied"]:
            u = updates[uid]
            base = decode(blobs.get(by_id[u.round_id].global_in))[0]
            params = decode(blobs.get(u.blob_hash))[0]
            w = u.num_examples * (1 + version - by_id[u.round_id].number) ** -0.5
            for k in num:
                num[k] += w * (params[k].astype(np.float64) - base[k])
            den += w
        made = decode(blobs.get(r.global_in))[0]
        for k in made:
            np.testing.assert_allclose(made[k], current[k] + num[k] / den, atol=1e-5)


@pytest.mark.parametrize("extra", [{"privacy": {"noise_multiplier": 1, "clip_norm": 1, "epsilon_budget": 5}}])
def test_fedbuff_with_a_cohort_feature_is_refused(coord, extra):
    coord.site("a"), coord.site("b")
    with pytest.raises(ValidationError, match="asynchronous"):
        coord.admin.post_json("/v1/jobs", {**ASYNC, **extra})
